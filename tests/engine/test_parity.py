"""Logits of our engine equal transformers' on the same tiny random weights (fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvcluster.engine import small_gemm
from kvcluster.engine.model import LlamaModel
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import hf_logits, make_runner, prompt

ATOL = 1e-4
ARCHS = ["llama", "llama3", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch, tiny_dirs, hf_models):
    runner = make_runner(tiny_dirs[arch])
    tokens = prompt(23, seed=1)
    ours = runner.prefill(Sequence("a", tokens), all_logits=True)  # [23, vocab]
    expected = hf_logits(hf_models[arch], tokens)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= ATOL
    last = runner.prefill(Sequence("b", tokens))  # last position only
    assert (last - expected[-1]).abs().max().item() <= ATOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_twenty_greedy_decode_steps_match_transformers(arch, tiny_dirs, hf_models):
    runner = make_runner(tiny_dirs[arch])
    seq = Sequence("a", prompt(9, seed=2))
    step_logits = [runner.prefill(seq)]
    for _ in range(20):
        seq.append_token(int(step_logits[-1].argmax()))
        step_logits.append(runner.decode_step([seq])[0])
    expected = hf_logits(hf_models[arch], seq.token_ids)[8:]  # from the last prompt position
    ours = torch.stack(step_logits)  # [21, vocab]
    assert (ours - expected).abs().max().item() <= ATOL
    # the block table crossed several 4-token blocks
    assert len(seq.block_table) == -(-seq.num_tokens // 4) == 8


def test_greedy_tokens_equal_transformers_generate(tiny_dirs, hf_models):
    runner = make_runner(tiny_dirs["llama"])
    tokens = prompt(7, seed=3)
    seq = Sequence("a", tokens)
    logits = runner.prefill(seq)
    for _ in range(20):
        seq.append_token(int(logits.argmax()))
        logits = runner.decode_step([seq])[0]
    hf = hf_models["llama"].generate(
        torch.tensor([tokens]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
        attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
    )
    assert seq.output_ids == hf[0, len(tokens):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_with_half_the_prompt_from_imported_blocks(arch, tiny_dirs, hf_models):
    runner = make_runner(tiny_dirs[arch])
    tokens = prompt(24, seed=4)
    donor = Sequence("donor", tokens[:12])
    runner.prefill(donor)
    kv = runner.cache.export_blocks(donor.block_table)  # [L, 2, 12, H_kv, D]
    fresh = runner.blocks.allocate(3)
    assert not set(fresh) & set(donor.block_table)
    runner.cache.import_blocks(fresh, kv)
    donor_blocks = list(donor.block_table)
    runner.free(donor)
    runner.cache.pool[:, :, donor_blocks].fill_(float("nan"))  # must not be read

    seq = Sequence("b", tokens)
    seq.attach_cached(fresh, num_tokens=12)
    ours = runner.prefill(seq, all_logits=True)  # only the 12 uncached positions
    expected = hf_logits(hf_models[arch], tokens)[12:]
    assert ours.shape == expected.shape == (12, 320)
    assert (ours - expected).abs().max().item() <= ATOL
    assert seq.block_table[:3] == fresh


def test_prefill_with_prefix_not_block_aligned_and_fully_cached(tiny_dirs, hf_models):
    runner = make_runner(tiny_dirs["llama"])
    tokens = prompt(15, seed=5)
    expected = hf_logits(hf_models["llama"], tokens)
    donor = Sequence("donor", tokens)
    runner.prefill(donor)
    seq = Sequence("b", tokens)  # 10 of 15 tokens cached: mid-block boundary
    runner.blocks.share(donor.block_table[:3])
    seq.attach_cached(donor.block_table[:3], num_tokens=10)
    assert (runner.prefill(seq, all_logits=True) - expected[10:]).abs().max().item() <= ATOL
    whole = Sequence("c", tokens)  # everything cached: the last token is recomputed
    runner.blocks.share(donor.block_table)
    whole.attach_cached(donor.block_table, num_tokens=15)
    assert (runner.prefill(whole) - expected[-1]).abs().max().item() <= ATOL


@pytest.mark.parametrize("arch,path", [("llama3", "native"), ("qwen2", "onednn"),
                                       ("llama", "plain")])
def test_ragged_batch_of_four_decoded_together(arch, path, tiny_dirs, hf_models, monkeypatch):
    """Every matmul path: the native kernel's packed panels, oneDNN-packed weights
    (the fallback without a C compiler) and plain ``x @ w``."""
    if path == "native" and not small_gemm.available():
        pytest.skip("no C compiler / not x86-64")
    if path == "onednn":
        monkeypatch.setattr(small_gemm, "available", lambda: False)
    runner = make_runner(tiny_dirs[arch], packed=path != "plain")
    packed = runner.model.layers[0].packed.get("qkv")
    assert (packed is None, packed is not None and packed.is_mkldnn) == (
        path == "plain", path == "onednn")
    seqs = [Sequence(f"r{i}", prompt(n, seed=10 + i)) for i, n in enumerate((3, 17, 8, 30))]
    last = {s.request_id: runner.prefill(s) for s in seqs}
    step_logits = {s.request_id: [] for s in seqs}
    for _ in range(6):
        for seq in seqs:
            seq.append_token(int(last[seq.request_id].argmax()))
        logits = runner.decode_step(seqs)  # [4, vocab]
        for i, seq in enumerate(seqs):
            last[seq.request_id] = logits[i]
            step_logits[seq.request_id].append(logits[i])
    for seq in seqs:
        expected = hf_logits(hf_models[arch], seq.token_ids)[-6:]
        ours = torch.stack(step_logits[seq.request_id])
        assert (ours - expected).abs().max().item() <= ATOL, seq.request_id


def test_llama3_rope_scaling_is_applied(tiny_dirs, hf_models):
    """Dropping the scaling changes the logits by far more than the tolerance."""
    runner = make_runner(tiny_dirs["llama3"])
    tokens = prompt(40, seed=6)
    expected = hf_logits(hf_models["llama3"], tokens)
    assert (runner.prefill(Sequence("a", tokens), all_logits=True) - expected).abs().max() <= ATOL
    unscaled_arch = dataclasses.replace(runner.arch, rope_scaling=None)
    unscaled = LlamaModel(unscaled_arch, 512)
    unscaled.load_state_dict(runner.model.state_dict(), strict=False)
    runner.model = unscaled
    ours = runner.prefill(Sequence("b", tokens), all_logits=True)
    assert (ours - expected).abs().max().item() > 1e-2


def test_half_precision_runs_close_to_fp32(tiny_dirs):
    tokens = prompt(12, seed=7)
    fp32 = make_runner(tiny_dirs["llama"]).prefill(Sequence("a", tokens), all_logits=True)
    for dtype in ("bfloat16", "float16"):
        runner = make_runner(tiny_dirs["llama"], dtype=dtype)
        assert runner.layout.dtype == dtype and runner.cache.pool.dtype == getattr(torch, dtype)
        seq = Sequence("a", tokens[:8])
        runner.prefill(seq)
        for token in tokens[8:]:
            seq.append_token(token)
            runner.decode_step([seq])
        ours = runner.prefill(Sequence("b", tokens), all_logits=True)
        assert ours.dtype == torch.float32
        assert (ours - fp32).abs().max().item() < 0.5, dtype
