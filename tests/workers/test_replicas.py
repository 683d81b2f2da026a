"""Several front ends (router replicas) on one set of detached worker pools.

Real Ray, real Redis (the workers' KV events reach every replica through Redis
Streams), the tiny model. Two ClusterThreads in this process stand in for two
replicas: the second attaches to the pools the first started, serves while the
first is gone, and a front end with another worker config is refused.
"""

from __future__ import annotations

import os
import shutil

import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.config import ClusterConfig, ConfigError, from_dict, to_dict
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from kvcluster.runtime.pools import PoolConfigMismatch, stop_pools
from tests.kvstore.helpers import RedisServer
from tests.workers.conftest import tiny_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.redis

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3 + "Why?"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


def _detached(tiny_model, redis_url: str, **engine) -> ClusterConfig:
    data = to_dict(tiny_config(tiny_model, router={"port": 0}, engine=engine))
    data["workers"]["detached"] = True
    return from_dict(ClusterConfig, dict(data, redis_url=redis_url))


def _pids(handle: ClusterThread) -> list[int]:
    pools = handle.cluster.pools
    return [ray.get(h.actor.info.remote())["pid"] for h in pools.prefill + pools.decode]


def _generate(handle: ClusterThread):
    with KVClusterClient(handle.address) as client:
        return client.generate(PROMPT, params=SamplingParams(max_new_tokens=4), timeout_s=60)


def test_replicas_share_detached_pools_and_outlive_each_other(tiny_model, redis_url):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = _detached(tiny_model, redis_url)
    first = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    second = None
    try:
        second = ClusterThread(config, num_cpus=2, start_timeout_s=240)
        assert _pids(second) == _pids(first)  # attached, not started again
        before = _generate(first)
        first.close()  # a replica goes away: the detached actors stay
        first = None
        after = _generate(second)
        assert after.token_ids == before.token_ids and after.final.num_output_tokens == 4
        with pytest.raises(PoolConfigMismatch, match="another worker config"):
            ClusterThread(_detached(tiny_model, redis_url, max_batch_size=3), num_cpus=2)
    finally:
        for handle in (first, second):
            if handle is not None:
                handle.close()
        assert stop_pools(config) == 2
        ray.shutdown()


def test_detached_pools_need_redis(tiny_model):
    data = to_dict(tiny_config(tiny_model))
    data["workers"]["detached"] = True
    with pytest.raises(ConfigError, match="workers.detached"):
        from_dict(ClusterConfig, data)
