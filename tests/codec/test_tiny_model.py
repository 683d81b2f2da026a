"""A tiny random model's KV (no structure to exploit) still round-trips and degrades gracefully."""

from __future__ import annotations

import pytest
import torch

from kvcluster.engine.sequence import Sequence
from kvstore.codec import get_codec, level_names
from tests.codec.conftest import tiny_runner

PROMPT = list(range(1, 97))  # 96 byte tokens
NEXT = [40, 41, 42, 43, 44, 45, 46, 47]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return tiny_runner(tmp_path_factory.mktemp("codec_tiny") / "llama", num_blocks=64, max_model_len=256)


def test_tiny_model_kv_degrades_gracefully(runner):
    seq = Sequence("ctx", PROMPT)
    runner.prefill(seq)
    blocks = list(seq.block_table)
    kv32 = runner.cache.export_blocks(blocks)
    layout16 = runner.layout.with_dtype("float16")
    kv16 = kv32.to(torch.float16)
    reference = _next_logits(runner, blocks, kv16.float())
    sizes, kv_errors, logit_errors = [], [], []
    for name in level_names():
        codec = get_codec(name)
        stream = codec.encode(kv16, layout16)
        out = codec.decode(stream, layout16)
        sizes.append(len(stream))
        kv_errors.append(float((out.float() - kv16.float()).pow(2).mean() / kv16.float().pow(2).mean()))
        logits = _next_logits(runner, blocks, out.float())
        logit_errors.append(float((logits - reference).abs().max()))
    runner.free(seq)
    assert kv_errors[0] == 0.0 and logit_errors[0] == 0.0  # lossless
    assert sizes[1:] == sorted(sizes[1:], reverse=True)  # int8, then each level smaller
    assert kv_errors[2:] == sorted(kv_errors[2:])  # and coarser
    for name, err in zip(level_names()[2:], kv_errors[2:]):
        alpha = get_codec(name).spec.max_alpha(layout16)
        assert err <= alpha ** 2 / 12 * 1.1  # uniform-noise MSE of the step: nothing worse
    assert logit_errors[1:] == sorted(logit_errors[1:])  # quality falls with the bitrate, smoothly
    assert logit_errors[2] < 0.05 * float(reference.abs().max())  # the finest level stays close


def test_tiny_model_float32_layout_round_trips(runner):
    seq = Sequence("ctx32", PROMPT[:40])
    runner.prefill(seq)
    kv32 = runner.cache.export_blocks(seq.block_table)
    runner.free(seq)
    for name in level_names():
        codec = get_codec(name)
        out = codec.decode(codec.encode(kv32, runner.layout), runner.layout)
        assert out.dtype == torch.float32 and out.shape == kv32.shape
        rel = float((out - kv32).pow(2).mean() / kv32.pow(2).mean())
        assert rel < 0.5
    lossless = get_codec("lossless")
    assert torch.equal(lossless.decode(lossless.encode(kv32, runner.layout), runner.layout), kv32)


def _next_logits(runner, blocks, kv: torch.Tensor) -> torch.Tensor:
    runner.cache.import_blocks(blocks, kv)
    seq = Sequence("probe", PROMPT + NEXT)
    runner.blocks.share(blocks)
    seq.attach_cached(blocks, len(PROMPT))
    try:
        return runner.prefill(seq, all_logits=True)  # [len(NEXT), vocab]
    finally:
        runner.free(seq)
