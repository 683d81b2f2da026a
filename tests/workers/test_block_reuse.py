"""Freed blocks that the engine's prefix cache still knows must never be handed out
behind its back: the received-KV sink and the store loader allocate from the same owner.

Free-list order makes the reuse exact: a short prompt A is decoded (its full blocks
registered, then freed to the tail of the free list); a long prompt B whose KV comes
from elsewhere (the local kvstore, or a prefill worker's stream) takes every block
before A's and then A's own; A asked again must still answer exactly as the first time.
"""

from __future__ import annotations

import asyncio

import pytest

from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import DecodeTask, PrefillTask
from kvcluster.engine.sequence import Sequence
from kvcluster.worker.node import build_runner
from tests.workers.conftest import running_workers, tiny_config
from tests.workers.test_disaggregated import reference_tokens

NUM_BLOCKS = 32  # block_size 4: 128 tokens in the whole pool
PROMPT_A = tuple((11 * i + 5) % 250 + 3 for i in range(15))  # 3 full blocks + 3 tokens
PROMPT_B = tuple((7 * i + 3) % 300 + 10 for i in range(113))  # 7 store chunks + 1 token
GREEDY = SamplingParams(max_new_tokens=8)
SHORT = SamplingParams(max_new_tokens=2)


@pytest.fixture
def small_pool(tiny_model):
    return tiny_config(tiny_model, engine={"num_blocks": NUM_BLOCKS},
                       store={"host": {"capacity_bytes": 16 << 20}})


async def _generate(decode, task, kv_source: str = "") -> list[int]:
    steps = [step async for step in decode.generate(task)]
    assert not kv_source or steps[-1].kv_source == kv_source, steps[-1]
    return [s.token_id for s in steps[:-1]]


def _store_prompt(decode, config, prompt) -> int:
    """Put ``prompt``'s whole chunks into the decode worker's kvstore (computed elsewhere)."""
    runner = build_runner(config)
    seq = Sequence("elsewhere", list(prompt))
    runner.prefill(seq)
    keys = decode.node.chunk_keys(prompt[:-1], "")
    kv = runner.cache.export_blocks(seq.block_table[:len(keys) * decode.node.blocks_per_chunk])
    decode.node.save_chunks(keys, kv, "")
    return decode.node.store.lookup(keys).num_chunks


def test_kv_loaded_from_the_store_never_overwrites_cached_blocks(small_pool):
    with running_workers(small_pool) as (loop, _prefill, decode, _address):
        assert _store_prompt(decode, small_pool, PROMPT_B) == 7
        first = loop.run_until_complete(_generate(decode, DecodeTask("a1", PROMPT_A, GREEDY)))
        assert first == reference_tokens(small_pool, PROMPT_A)
        loop.run_until_complete(_generate(decode, DecodeTask("b", PROMPT_B, SHORT),
                                          kv_source="local-store"))
        # B's load took A's first blocks: A is recomputed (its registration went with them)
        again = loop.run_until_complete(_generate(decode, DecodeTask("a2", PROMPT_A, GREEDY),
                                                  kv_source="none"))
        assert again == first


def test_received_kv_never_overwrites_cached_blocks(small_pool):
    with running_workers(small_pool) as (loop, prefill, decode, address):
        first = loop.run_until_complete(_generate(decode, DecodeTask("a1", PROMPT_A, GREEDY)))

        async def streamed_b():
            task = DecodeTask("b", PROMPT_B, SHORT, expect_kv=True, kv_timeout_s=20)
            tokens, result = await asyncio.gather(
                _generate(decode, task), prefill.prefill(PrefillTask("b", PROMPT_B, "", address)))
            assert result.transfer_ok and result.num_transferred_tokens == 112
            return tokens

        loop.run_until_complete(streamed_b())
        again = loop.run_until_complete(_generate(decode, DecodeTask("a2", PROMPT_A, GREEDY)))
        assert again == first
