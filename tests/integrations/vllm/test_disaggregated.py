"""``engine.kind: vllm`` disaggregated: a vLLM prefill actor computes the prompt and
streams its whole chunks over kvcluster's transfer to a vLLM decode actor, whose
connector loads them into vLLM's paged blocks; greedy tokens equal stock vLLM's. A
prefill actor gone before streaming: the decoder computes the prompt, same tokens.

One cluster (two vLLM engines, the only module with two) for the module.
"""

from __future__ import annotations

import time

import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.hashing import ExtraKeys
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from tests.integrations.vllm.conftest import CHUNK_TOKENS, MAX_NEW_TOKENS, vllm_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(stock_outputs):
    config = vllm_config(workers={"colocated": False, "num_prefill": 1, "num_decode": 1,
                                  "max_queue": 4, "max_local_prefill_tokens": 0},
                         transfer={"timeout_s": 30.0})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=400)
    yield handle
    handle.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with KVClusterClient(cluster.address) as grpc_client:
        yield grpc_client


def _generate(client, ids, tenant):
    return client.generate(token_ids=ids, params=SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS, temperature=0.0), tenant=tenant, timeout_s=180)


def test_prefill_streams_whole_chunks_into_the_decoders_paged_blocks(cluster, client,
                                                                     prompts, stock_outputs):
    result = _generate(client, prompts["long"], "pd-tenant")
    assert result.token_ids == stock_outputs["long"]
    final = result.final
    assert (final.prefill_instance, final.decode_instance) == ("prefill-0", "decode-0")
    assert final.cached_tokens_by_tier.get("transfer") == 2 * CHUNK_TOKENS  # vLLM loaded them
    assert final.num_cached_tokens == sum(final.cached_tokens_by_tier.values())
    assert set(cluster.cluster.backend.kv_events) == {"prefill", "decode"}
    sent = cluster.cluster.backend.stats["prefill_results"][-1]
    assert sent.transfer_ok and sent.num_transferred_tokens == 2 * CHUNK_TOKENS
    assert sent.wire_bytes > 0


def test_the_next_turn_skips_the_prefill_hop_by_vllms_kv_events(cluster, client, prompts,
                                                                stock_outputs, tokenizer):
    """Turn 1 went through prefill-0; the decode instance's KV events (vLLM's, through
    router.vllm_subscriber) tell the decode router it now holds both whole chunks, so
    turn 2 (turn 1 + its answer + a question) is decoded there with no prefill hop."""
    turn1 = prompts["long"]
    _generate(client, turn1, "pd-chat")
    turn2 = turn1 + stock_outputs["long"] + tokenizer.encode(" And then?")
    assert len(turn2) // CHUNK_TOKENS == len(turn1) // CHUNK_TOKENS == 2
    backend = cluster.cluster.backend
    decode = cluster.cluster.pools.decode[0]
    route = backend.routers["decode"].request_for(
        turn2, ExtraKeys(backend.model_id, "pd-chat"), "probe")
    deadline = time.monotonic() + 10
    while backend._uncached_on(decode, route):
        assert time.monotonic() < deadline, "the decode router never learned turn 1"
        time.sleep(0.1)
    result = _generate(client, turn2, "pd-chat")
    assert result.final.prefill_instance == ""  # no hop: decode-0 holds the prefix
    assert result.final.num_cached_tokens >= 2 * CHUNK_TOKENS


def test_short_prompt_needs_no_transfer(client, prompts, stock_outputs):
    result = _generate(client, prompts["short"], "pd-short")  # under one store chunk
    assert result.token_ids == stock_outputs["short"]
    assert "transfer" not in result.final.cached_tokens_by_tier


def test_a_dead_prefill_actor_costs_only_the_recompute(cluster, client, prompts,
                                                       stock_outputs):
    """Last in the module: the prefill actor is killed for good, the router still has
    it; the decoder is told nobody will stream, computes the prompt, same tokens."""
    prefill = cluster.cluster.pools.prefill[0]
    ray.kill(prefill.actor, no_restart=True)
    result = _generate(client, prompts["evict_1"], "pd-dead")
    assert result.token_ids == stock_outputs["evict_1"]
    assert result.final.prefill_instance == ""
    assert "transfer" not in result.final.cached_tokens_by_tier
