"""The decode KV mirror: batches that change membership and order, growth, preemption,
and the gather path it replaces; every step's logits checked against transformers."""

from __future__ import annotations

import pytest
import torch

from kvcluster.common.config import EngineConfig
from kvcluster.engine.decode_kv import GROW_TOKENS
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import hf_logits, prompt

ATOL = 1e-4


def _runner(path, mirror: bool) -> ModelRunner:
    config = EngineConfig(block_size=4, num_blocks=256, max_model_len=512,
                          decode_kv_mirror=mirror)
    return ModelRunner.from_pretrained(path, engine_config=config)


def _step(runner, seqs, last) -> None:
    """One greedy decode step of ``seqs``; ``last`` maps request id -> its latest logits."""
    for seq in seqs:
        seq.append_token(int(last[seq.request_id].argmax()))
    logits = runner.decode_step(seqs)  # [B, vocab]
    for i, seq in enumerate(seqs):
        last[seq.request_id] = logits[i]


def _check(model, seq, logits) -> None:
    expected = hf_logits(model, seq.token_ids)[-1]
    assert (logits - expected).abs().max().item() <= ATOL, seq.request_id


@pytest.mark.parametrize("mirror", [True, False])
def test_batch_that_shrinks_reorders_and_grows(mirror, tiny_dirs, hf_models):
    runner, model = _runner(tiny_dirs["llama"], mirror), hf_models["llama"]
    seqs = [Sequence(f"r{i}", prompt(n, seed=70 + i)) for i, n in enumerate((5, 14, 3, 9))]
    last = {s.request_id: runner.prefill(s) for s in seqs}
    for _ in range(3):
        _step(runner, seqs, last)
    runner.free(seqs.pop(1))  # a request in the middle finishes
    seqs.reverse()  # the rest move to other slots
    joiner = Sequence("r4", prompt(7, seed=74))
    last[joiner.request_id] = runner.prefill(joiner)
    seqs.insert(1, joiner)
    for _ in range(3):
        _step(runner, seqs, last)
    for seq in seqs:
        _check(model, seq, last[seq.request_id])
    assert (runner.decode_kv is not None) == mirror


def test_mirror_grows_past_its_capacity(tiny_dirs, hf_models):
    runner = _runner(tiny_dirs["qwen2"], mirror=True)
    seqs = [Sequence("long", prompt(GROW_TOKENS - 2, seed=80)), Sequence("short", prompt(4, seed=81))]
    last = {s.request_id: runner.prefill(s) for s in seqs}
    _step(runner, seqs, last)
    assert runner.decode_kv.capacity == GROW_TOKENS
    for _ in range(3):
        _step(runner, seqs, last)
    assert runner.decode_kv.capacity == 2 * GROW_TOKENS
    for seq in seqs:
        _check(hf_models["qwen2"], seq, last[seq.request_id])


def test_preempted_sequence_is_recopied_and_memory_released(tiny_dirs, hf_models):
    runner = _runner(tiny_dirs["llama3"], mirror=True)
    seq = Sequence("a", prompt(6, seed=90))
    last = {"a": runner.prefill(seq)}
    _step(runner, [seq], last)
    runner.free(seq)  # preempted: blocks freed, recomputed by a new prefill
    assert runner.decode_kv.buffer is None
    seq.num_computed_tokens = 0
    seq.append_token(int(last["a"].argmax()))
    last["a"] = runner.prefill(seq)
    for _ in range(2):
        _step(runner, [seq], last)
    _check(hf_models["llama3"], seq, last["a"])
    assert runner.decode_kv.buffer is not None


def test_mirror_rebuilds_when_its_length_disagrees(tiny_dirs):
    """A step that failed after preparing the mirror must not leave stale KV behind."""
    runner = _runner(tiny_dirs["llama"], mirror=True)
    reference = _runner(tiny_dirs["llama"], mirror=False)
    outs = []
    for r in (runner, reference):
        seq = Sequence("a", prompt(8, seed=95))
        last = {"a": r.prefill(seq)}
        _step(r, [seq], last)
        if r is runner:
            r.decode_kv.prepare([seq])  # as if the next forward had raised
        _step(r, [seq], last)
        outs.append(last["a"])
    assert torch.allclose(outs[0], outs[1], atol=ATOL)
