"""A bf16 prefill of a short uncached tail after a long cached prefix (a chat's later
turn) through the packed weights on AMX gives the tokens and logits of the plain torch
prefill; fp32 keeps the plain path."""

from __future__ import annotations

import pytest
import torch

from kvcluster.common.config import EngineConfig
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine import small_gemm
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import make_runner, prompt

needs_amx = pytest.mark.skipif(not (small_gemm.available() and small_gemm.amx_available()),
                               reason="no AMX tiles on this CPU (or no native kernel)")
BLOCK = 16
PREFIX = 448  # 28 whole blocks; the tiny models' context is 512
TAILS = [1, 15, 16, 17, 33, 50]  # within one block, exactly one, across two and three


@pytest.fixture(scope="module")
def bf16_runner(tiny_dirs) -> ModelRunner:
    return make_runner(tiny_dirs["llama"], block_size=BLOCK, num_blocks=128, dtype="bfloat16")


def _tail_logits(runner: ModelRunner, tokens: list[int], prefix: int,
                 all_logits: bool = True) -> torch.Tensor:
    """Logits ``[len(tokens) - prefix, vocab]`` of the tokens after a cached ``prefix``
    (``[vocab]`` of the last one without ``all_logits``)."""
    donor = Sequence("donor", tokens[:prefix])
    runner.prefill(donor)
    cached = donor.block_table[: prefix // BLOCK]
    seq = Sequence("turn", tokens)
    runner.blocks.share(cached)
    seq.attach_cached(cached, prefix)
    try:
        return runner.prefill(seq, all_logits=all_logits)
    finally:
        runner.free(seq)
        runner.free(donor)


@needs_amx
def test_bf16_prefill_goes_through_amx_and_fp32_stays_plain(tiny_dirs, bf16_runner, monkeypatch):
    assert bf16_runner.packed_prefill
    assert not make_runner(tiny_dirs["llama"], block_size=BLOCK).packed_prefill
    calls = []
    real = small_gemm.matmul
    monkeypatch.setattr(small_gemm, "matmul", lambda x, packed, *args: (
        calls.append((x.shape[0], small_gemm.uses_amx(x, packed))) or real(x, packed, *args)))
    _tail_logits(bf16_runner, prompt(PREFIX + 17, seed=1), PREFIX, all_logits=False)
    layers = len(bf16_runner.model.layers)
    # the donor's 448 rows and the tail's 17 through every layer's four matrices on AMX;
    # each lm_head (the last row only) on the one-row FMA path
    assert calls.count((PREFIX, True)) == calls.count((17, True)) == 4 * layers
    assert calls.count((1, False)) == 2 and len(calls) == 8 * layers + 2


@needs_amx
@pytest.mark.parametrize("tail", TAILS)
def test_tail_after_cached_prefix_matches_the_plain_prefill(bf16_runner, tail):
    tokens = prompt(PREFIX + tail, seed=100 + tail)
    fast = _tail_logits(bf16_runner, tokens, PREFIX)  # [tail, vocab]
    bf16_runner.packed_prefill = False
    try:
        plain = _tail_logits(bf16_runner, tokens, PREFIX)
    finally:
        bf16_runner.packed_prefill = True
    assert fast.shape == plain.shape == (tail, bf16_runner.arch.vocab_size)
    assert (fast - plain).abs().max().item() <= _bf16_tolerance(plain)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


@needs_amx
def test_tail_logits_equal_the_whole_prompts_logits_at_those_positions(bf16_runner):
    tokens = prompt(PREFIX + 33, seed=7)
    whole = bf16_runner.prefill(Sequence("whole", tokens), all_logits=True)[PREFIX:]
    tail = _tail_logits(bf16_runner, tokens, PREFIX)
    assert (tail - whole).abs().max().item() <= _bf16_tolerance(whole)


def _bf16_tolerance(logits: torch.Tensor) -> float:
    """A few bf16 roundings of the largest logit (other orders of summation round
    differently; a wrong product is off by whole units)."""
    return 4 * 2**-8 * logits.abs().max().item()


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_dir) -> ModelRunner:
    config = EngineConfig(block_size=BLOCK, num_blocks=160, max_model_len=2048)
    return ModelRunner.from_pretrained(smollm2_dir, dtype="bfloat16", engine_config=config)


@needs_amx
def test_smollm2_later_turns_give_the_same_greedy_tokens_as_the_plain_prefill(smollm2_bf16):
    """The demo's later-turn shape: 512 cached tokens, a 17..50-token tail, greedy."""
    base = [(i * 37) % 20000 + 100 for i in range(512)]
    turns = [base + [(j * 53) % 20000 + 200 + tail for j in range(tail)] for tail in (17, 50)]
    outputs = {}
    for packed in (True, False):
        smollm2_bf16.packed_prefill = packed
        engine = LLMEngine(smollm2_bf16, stop_on_eos=False)
        engine.generate([base + [7]], SamplingParams(max_new_tokens=1))  # registers the prefix
        outputs[packed] = engine.generate(turns, SamplingParams(max_new_tokens=8))
        assert engine.blocks.num_used == 0
        smollm2_bf16.blocks.reset_prefix_cache()
    smollm2_bf16.packed_prefill = True
    assert outputs[True] == outputs[False]
