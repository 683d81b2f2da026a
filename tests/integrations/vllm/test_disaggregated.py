"""``engine.kind: vllm`` disaggregated: a vLLM prefill instance's worker process
streams the prompt's whole chunks over kvcluster's transfer straight into the paged
blocks of a vLLM decode instance, whose request waits in vLLM (an async KV load) from
the moment the task arrives; greedy tokens equal stock vLLM's. The next turn goes to
the decode instance vLLM's KV events say holds its prefix, with no prefill hop. A
prefill instance killed mid-transfer or gone before streaming: the decoder computes
what did not arrive; a decode actor killed mid-stream: the other one finishes the
request; same tokens.

One cluster (three vLLM engines: one prefill, two decode) for the module. Its streams
are paced (transfer.sender_pace_bits_per_s) so that a kill lands mid-transfer.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.hashing import ExtraKeys
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from tests.integrations.vllm.conftest import CHUNK_TOKENS, MAX_NEW_TOKENS, vllm_config

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

PACE_BITS_PER_S = 100e6
"""~1 s per 256-token transfer chunk of SmolLM2's fp32 KV (46 KB a token)."""


@pytest.fixture(scope="module")
def cluster(stock_outputs):
    config = vllm_config(workers={"colocated": False, "num_prefill": 1, "num_decode": 2,
                                  "max_queue": 4, "max_local_prefill_tokens": 0},
                         transfer={"timeout_s": 30.0, "policy": "lossless",  # exact KV
                                   "chunk_tokens": CHUNK_TOKENS,
                                   "sender_pace_bits_per_s": PACE_BITS_PER_S})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=400)
    yield handle
    handle.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with KVClusterClient(cluster.address) as grpc_client:
        yield grpc_client


def _generate(client, ids, tenant, max_new_tokens=MAX_NEW_TOKENS):
    return client.generate(token_ids=ids, params=SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0), tenant=tenant, timeout_s=180)


def test_prefill_streams_whole_chunks_into_the_decoders_paged_blocks(cluster, client,
                                                                     prompts, stock_outputs):
    result = _generate(client, prompts["long"], "pd-tenant")
    assert result.token_ids == stock_outputs["long"]
    final = result.final
    assert final.prefill_instance == "prefill-0"
    assert final.decode_instance in ("decode-0", "decode-1")
    assert final.cached_tokens_by_tier.get("transfer") == 2 * CHUNK_TOKENS  # vLLM loaded them
    assert final.num_cached_tokens == sum(final.cached_tokens_by_tier.values())
    assert final.stage_ms["kv_transfer"] > 0  # vLLM held the request while KV streamed in
    assert set(cluster.cluster.backend.kv_events) == {"prefill", "decode"}
    sent = cluster.cluster.backend.stats["prefill_results"][-1]
    assert sent.transfer_ok and sent.num_transferred_tokens == 2 * CHUNK_TOKENS
    assert sent.wire_bytes > 0 and sent.levels == ["lossless", "lossless"]
    receiver = _receiver_stats(cluster, final.decode_instance)
    assert receiver["requests_filled"] >= 1 and receiver["tokens_written"] >= 2 * CHUNK_TOKENS


def test_the_next_turn_skips_the_prefill_hop_by_vllms_kv_events(cluster, client, prompts,
                                                                stock_outputs, tokenizer):
    """Turn 1 went through prefill-0 to one of two decode instances; that instance's KV
    events (vLLM's, through router.vllm_subscriber) tell the decode router it now holds
    both whole chunks, so turn 2 (turn 1 + its answer + a question) is routed to it and
    decoded there with no prefill hop."""
    turn1 = prompts["long"]
    holder = _generate(client, turn1, "pd-chat").final.decode_instance
    turn2 = turn1 + stock_outputs["long"] + tokenizer.encode(" And then?")
    assert len(turn2) // CHUNK_TOKENS == len(turn1) // CHUNK_TOKENS == 2
    backend = cluster.cluster.backend
    decode = cluster.cluster.pools.by_id(holder)
    route = backend.routers["decode"].request_for(
        turn2, ExtraKeys(backend.model_id, "pd-chat"), "probe")
    deadline = time.monotonic() + 10
    while backend._uncached_on(decode, route):
        assert time.monotonic() < deadline, "the decode router never learned turn 1"
        time.sleep(0.1)
    result = _generate(client, turn2, "pd-chat")
    assert result.final.decode_instance == holder
    assert result.final.prefill_instance == ""  # no hop: the holder computes the tail
    assert result.final.num_cached_tokens >= 2 * CHUNK_TOKENS


def test_short_prompt_needs_no_transfer(client, prompts, stock_outputs):
    result = _generate(client, prompts["short"], "pd-short")  # under one store chunk
    assert result.token_ids == stock_outputs["short"]
    assert "transfer" not in result.final.cached_tokens_by_tier


def test_a_prefill_killed_mid_transfer_costs_the_decoder_only_the_recompute(
        cluster, client, prompts, stock_outputs):
    """kill -9 of the prefill actor and its vLLM processes (where the sender runs) once
    the decoder has written the stream's first chunk and before the second: the
    decoder keeps what arrived, computes the rest, and answers as stock vLLM."""
    prefill = cluster.cluster.pools.prefill[0]
    pid = ray.get(prefill.actor.stats.remote(), timeout=30)["pid"]
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    short_before = {h.instance_id: _receiver_stats(cluster, h.instance_id)["requests_short"]
                    for h in cluster.cluster.pools.decode}
    answer = {}
    request = threading.Thread(target=lambda: answer.update(
        result=_generate(client, prompts["long"], "pd-midway")))
    request.start()
    midway, transfer_id, expected = _wait_for_a_stream_midway(cluster)
    assert transfer_id in expected  # vLLM holds the request's blocks while KV streams in
    ray.kill(prefill.actor, no_restart=True)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    request.join(180)
    result = answer["result"]
    assert result.token_ids == stock_outputs["long"]
    decoder = result.final.decode_instance
    assert decoder == midway
    assert result.final.cached_tokens_by_tier.get("transfer", 0) < 2 * CHUNK_TOKENS
    # what vLLM computed after all is not counted as cached (its figure is the plan's)
    assert result.final.num_cached_tokens == sum(result.final.cached_tokens_by_tier.values())
    assert _receiver_stats(cluster, decoder)["requests_short"] == short_before[decoder] + 1


def test_a_dead_prefill_actor_costs_only_the_recompute(cluster, client, prompts,
                                                       stock_outputs):
    """The prefill actor is dead for good (killed above), the router still has it; the
    decoder is told nobody will stream, computes the prompt, same tokens."""
    prefill = cluster.cluster.pools.prefill[0]
    ray.kill(prefill.actor, no_restart=True)  # already dead when the module runs whole
    result = _generate(client, prompts["evict_1"], "pd-dead")
    assert result.token_ids == stock_outputs["evict_1"]
    assert result.final.prefill_instance == ""
    assert "transfer" not in result.final.cached_tokens_by_tier


def test_a_decode_actor_killed_mid_stream_is_finished_by_the_other(cluster, client, prompts):
    """The decode actor streaming a request is killed (its vLLM engine with it) after a
    few tokens; the backend resumes on the other instance from the prompt plus the tokens
    already streamed: the same greedy tokens as an undisturbed run."""
    ids, num_tokens = prompts["short"], 60
    reference = _generate(client, ids, "pd-kill", num_tokens).token_ids
    stream = client.generate_stream(token_ids=ids, tenant="pd-kill-2", timeout_s=180,
                                    params=SamplingParams(max_new_tokens=num_tokens,
                                                          temperature=0.0))
    tokens = [t for _, e in zip(range(3), stream) for t in e.token_ids]
    serving = [h for h in cluster.cluster.pools.decode
               if ray.get(h.actor.stats.remote(), timeout=30)["active_requests"]]
    assert len(serving) == 1
    ray.kill(serving[0].actor, no_restart=True)
    events = list(stream)
    tokens += [t for e in events[:-1] for t in e.token_ids]
    assert tokens == reference
    assert events[-1].decode_instance not in ("", serving[0].instance_id)
    assert cluster.cluster.backend.stats["decode_retries"] == 1


def _receiver_stats(cluster, instance_id: str) -> dict:
    handle = cluster.cluster.pools.by_id(instance_id)
    return ray.get(handle.actor.stats.remote(), timeout=30)["kv_receiver"]


def _wait_for_a_stream_midway(cluster, timeout_s: float = 60) -> tuple[str, str, list]:
    """(decode instance, transfer id, the ids its vLLM waits for) of a stream that has
    chunks written and is still open."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for handle in cluster.cluster.pools.decode:
            stats = _receiver_stats(cluster, handle.instance_id)
            for transfer_id, stream in stats["streams"].items():
                if stream["decoded_tokens"] and not stream["done"]:
                    return handle.instance_id, transfer_id, stats["expected"]
        time.sleep(0.02)
    raise AssertionError("no stream was ever seen midway")
