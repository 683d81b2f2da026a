"""The whole system on a real local Ray cluster: front end, routers, actors, gRPC.

One cluster per module (Ray start-up costs seconds); tests run in order and
the later ones kill actors.
"""

from __future__ import annotations

import os
import time

import pytest

from kvcluster.client import KVClusterClient, TokenEvent
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.runtime.launcher import ClusterThread
from kvcluster.worker.node import build_runner
from tests.workers.conftest import tiny_config

ray = pytest.importorskip("ray")

DOC = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 byte tokens


@pytest.fixture(scope="module")
def cluster(tiny_model):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = tiny_config(tiny_model, workers={"num_prefill": 1, "num_decode": 2},
                         router={"heartbeat_ttl_s": 4.0, "port": 0, "silent_window_s": 30.0})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    yield handle
    handle.close()
    ray.shutdown()


def _expected(config_model, prompt_ids, max_new_tokens):
    runner = build_runner(tiny_config(config_model))
    engine = LLMEngine(runner)
    return engine.generate([list(prompt_ids)], SamplingParams(max_new_tokens=max_new_tokens))[0]


def test_request_goes_through_prefill_and_decode_pools(cluster, tiny_model):
    params = SamplingParams(max_new_tokens=6)
    with KVClusterClient(cluster.address) as client:
        first = client.generate(DOC + "Question one?", params=params, timeout_s=60)
        second = client.generate(DOC + "Question two?", params=params, timeout_s=60)
    assert first.final.prefill_instance == "prefill-0"
    assert first.final.decode_instance.startswith("decode-")
    assert len(first.token_ids) == first.final.num_output_tokens > 0
    prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(DOC + "Question one?")
    assert list(first.token_ids) == _expected(tiny_model, prompt_ids, 6)[:len(first.token_ids)]
    # The shared document's whole chunks came from a cache the second time: the
    # first request's events reached the decode router before the second was
    # routed (relayed right after each request), so it went where they are.
    assert second.final.num_cached_tokens >= 128
    assert second.final.decode_instance == first.final.decode_instance
    assert second.final.prefill_instance == ""  # no transfer needed


def test_decode_actor_killed_mid_generation_resumes(cluster, tiny_model):
    prompt = DOC + "Tell me a long story."
    params = SamplingParams(max_new_tokens=120)
    tokens, killed = [], []
    with KVClusterClient(cluster.address) as client:
        for event in client.generate_stream(prompt, params=params, timeout_s=120):
            if isinstance(event, TokenEvent):
                tokens.extend(event.token_ids)
                if len(tokens) >= 5 and not killed:
                    victim = _busy_decode_actor(cluster)
                    ray.kill(victim.actor, no_restart=False)
                    killed += [victim.instance_id, victim.address]
            else:
                final = event
    assert killed, "never got far enough to kill an actor"
    assert final.num_output_tokens == len(tokens)
    prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(prompt)
    expected = _expected(tiny_model, prompt_ids, 120)
    assert tokens == expected[:len(tokens)]
    assert cluster.cluster.backend.stats["decode_retries"] >= 1
    # Ray restarts the victim; its receiver comes back on a new port and rejoins.
    handle = cluster.cluster.pools.by_id(killed[0])
    old_address, deadline = killed[1], time.time() + 60
    registry = cluster.cluster.backend.routers["decode"].registry
    while time.time() < deadline and not (
            handle.address != old_address
            and any(i.instance_id == handle.instance_id for i in registry.alive())):
        time.sleep(0.5)
    assert handle.address != old_address
    assert any(i.instance_id == handle.instance_id for i in registry.alive())


def test_killed_prefill_actor_restarts_and_serves_again(cluster):
    handle = cluster.cluster.pools.prefill[0]
    router = cluster.cluster.backend.routers["prefill"]
    ray.kill(handle.actor, no_restart=False)
    served_by, deadline = [], time.time() + 90
    with KVClusterClient(cluster.address) as client:
        while time.time() < deadline:
            # A fresh prefix each time: no decode store holds it, so P is needed.
            result = client.generate(f"Request {len(served_by)}. " + DOC,
                                     params=SamplingParams(max_new_tokens=3), timeout_s=60)
            served_by.append(result.final.prefill_instance)
            assert result.final.num_output_tokens == 3  # served even while P was down
            if served_by[-1] == "prefill-0":
                break
            time.sleep(0.5)
    assert served_by[0] == "", "the killed prefill actor cannot have served"
    assert served_by[-1] == "prefill-0", f"never came back: {served_by}"
    assert any(i.instance_id == "prefill-0" for i in router.registry.alive())


def _busy_decode_actor(cluster):
    """The decode actor that has an active request right now."""
    pools = cluster.cluster.pools
    for handle in pools.decode:
        load, _, _ = ray.get(handle.actor.poll.remote(False), timeout=10)
        if load.active_decode_requests:
            return handle
    return pools.decode[0]
