"""PrefillWorker -> real gRPC -> DecodeWorker, driven directly (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.worker import DecodeWorker
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.errors import OverloadedError
from kvcluster.common.tasks import DecodeTask, PrefillTask
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.worker.node import build_runner
from tests.workers.conftest import running_workers, tiny_config

PROMPT = tuple((7 * i + 3) % 300 + 10 for i in range(70))  # 4 full chunks of 16 + 6 tokens
GREEDY = SamplingParams(max_new_tokens=8)


def reference_tokens(config, prompt=PROMPT, params=GREEDY) -> list[int]:
    engine = LLMEngine(build_runner(config), stop_on_eos=False)
    return engine.generate([list(prompt)], params)[0]


async def _collect(decode, task):
    steps = [step async for step in decode.generate(task)]
    return [s.token_id for s in steps[:-1]], steps[-1]


async def _request(prefill, decode, address, request_id, prompt=PROMPT, tenant=""):
    dtask = DecodeTask(request_id, prompt, GREEDY, tenant, expect_kv=True, kv_timeout_s=20)
    ptask = PrefillTask(request_id, prompt, tenant, address)
    (tokens, final), result = await asyncio.gather(_collect(decode, dtask),
                                                   prefill.prefill(ptask))
    return tokens, final, result


@pytest.fixture
def workers(config):
    with running_workers(config) as running:
        yield running


def test_transfer_then_decode_matches_local_generation(workers, config):
    loop, prefill, decode, address = workers
    tokens, final, result = loop.run_until_complete(
        _request(prefill, decode, address, "r1"))
    assert tokens == reference_tokens(config)
    assert final.kv_source == "transfer"
    assert result.num_transferred_tokens == 64 and result.transfer_ok
    assert result.num_computed_tokens == 64 and result.num_cached_tokens == 0
    assert result.wire_bytes > 0 and result.levels == ["lossless", "lossless"]
    assert final.num_cached_tokens == 64  # the decoder computed only the 6-token tail


def test_second_turn_hits_the_prefill_store_and_decode_keeps_chunks(workers, config):
    loop, prefill, decode, address = workers
    loop.run_until_complete(_request(prefill, decode, address, "t1"))
    tokens, final, result = loop.run_until_complete(_request(prefill, decode, address, "t2"))
    assert result.num_cached_tokens == 64 and result.num_computed_tokens == 0
    assert tokens == reference_tokens(config)
    keys = decode.node.chunk_keys(PROMPT, "")
    assert decode.node.store.lookup(keys).num_chunks == 4


def test_tenants_never_share_chunks(workers):
    loop, prefill, decode, address = workers
    loop.run_until_complete(_request(prefill, decode, address, "a", tenant="tenant-a"))
    _, _, result = loop.run_until_complete(
        _request(prefill, decode, address, "b", tenant="tenant-b"))
    assert result.num_cached_tokens == 0  # the NDSS probe: B's exact copy of A's prompt


def test_missing_stream_falls_back_to_recompute(workers, config):
    loop, prefill, decode, address = workers
    task = DecodeTask("lonely", PROMPT, GREEDY, expect_kv=True, kv_timeout_s=0.3)
    tokens, final = loop.run_until_complete(_collect(decode, task))
    assert final.kv_source == "recompute"
    assert tokens == reference_tokens(config)


def test_full_decode_pool_answers_overloaded(tiny_model):
    config = tiny_config(tiny_model, workers={"max_queue": 1})
    decode = DecodeWorker(config, "decode-x")
    loop = asyncio.new_event_loop()

    async def two_at_once():
        first = decode.generate(DecodeTask("one", PROMPT, SamplingParams(max_new_tokens=64)))
        await first.__anext__()
        with pytest.raises(OverloadedError, match="active requests"):
            await decode.generate(DecodeTask("two", PROMPT, GREEDY)).__anext__()
        await first.aclose()
        assert not decode.engine.has_unfinished() or "one" not in decode.engine.sequences

    try:
        loop.run_until_complete(two_at_once())
    finally:
        loop.run_until_complete(decode.close())
        loop.close()


def test_decode_alone_stores_what_it_computed_for_the_next_turn(tiny_model, config):
    """Colocated mode: no prefill worker; the next turn hits this worker's own store."""
    decode = DecodeWorker(config, "solo")
    decode.engine.eos_ids = frozenset()
    loop = asyncio.new_event_loop()
    try:
        _, first = loop.run_until_complete(_collect(decode, DecodeTask("s1", PROMPT, GREEDY)))
        assert first.kv_source == "none"
        keys = decode.node.chunk_keys(PROMPT, "")
        assert decode.node.store.lookup(keys).num_chunks == 4
        tokens, second = loop.run_until_complete(
            _collect(decode, DecodeTask("s2", PROMPT + (5, 6), GREEDY)))
        # the engine's own registered blocks hold more than the store: no copy from it
        assert second.kv_source == "prefix-cache" and second.num_cached_tokens == 68
        assert second.cached_tokens_by_tier == {"prefix_cache": 68}
        assert tokens == reference_tokens(config, PROMPT + (5, 6))
    finally:
        loop.run_until_complete(decode.close())
        loop.close()
