"""Every level round-trips within its documented error bound; lossless is bit-exact."""

from __future__ import annotations

import math

import pytest
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec import default_level, get_codec, level_names
from kvstore.codec.levels import LEVELS
from kvstore.codec.quantize import MAX_SYMBOL
from tests.codec.conftest import LAYOUT, structured_kv

LOSSY = [spec.name for spec in LEVELS]


def test_level_names_order_and_default():
    names = level_names()
    assert names[:2] == ["lossless", "int8"]
    assert names[2:] == LOSSY and len(LOSSY) >= 4
    assert default_level() in LOSSY
    with pytest.raises(ValueError, match="unknown codec level"):
        get_codec("L99")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_lossless_is_bit_exact(dtype):
    layout = LAYOUT.with_dtype(dtype)
    kv = structured_kv(layout)
    kv.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=kv.dtype)
    codec = get_codec("lossless")
    out = codec.decode(codec.encode(kv, layout), layout)
    assert out.dtype == kv.dtype and out.shape == kv.shape
    bits = torch.int32 if dtype == "float32" else torch.int16
    assert torch.equal(out.view(bits), kv.view(bits))


def test_int8_error_bound(kv, layout):
    codec = get_codec("int8")
    out = codec.decode(codec.encode(kv, layout), layout)
    x = kv.float()
    scale = x.abs().amax(dim=(-1, -2), keepdim=True) / MAX_SYMBOL
    bound = scale / 2 * (1 + 2 ** -9) + out.float().abs() * 2 ** -11
    assert bool(((out.float() - x).abs() <= bound).all())
    assert float((out.float() - x).abs().max()) > 0  # it is lossy


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_level_error_bound(name, dtype):
    """|x - xhat| <= max(alpha, sqrt(C)/127) / 2 * rms_t(x - mean), plus the output cast."""
    layout = LAYOUT.with_dtype(dtype)
    kv = structured_kv(layout)
    codec = get_codec(name)
    out = codec.decode(codec.encode(kv, layout), layout)
    assert out.dtype == kv.dtype and out.shape == kv.shape
    err = (out.float() - kv.float()).abs()
    assert bool((err <= _documented_bound(kv, out, layout, codec.spec.max_alpha(layout))).all())


def test_levels_get_smaller_and_coarser():
    layout, kv = LAYOUT, structured_kv(num_tokens=200)
    sizes, errors = [], []
    for level in LOSSY:
        codec = get_codec(level)
        stream = codec.encode(kv, layout)
        sizes.append(len(stream))
        errors.append(float((codec.decode(stream, layout).float() - kv.float()).pow(2).mean()))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert errors == sorted(errors) and errors[0] < errors[-1]
    assert len(get_codec("int8").encode(kv, layout)) > sizes[0]


def test_single_token_and_group_size_one(kv, layout):
    one = kv[:, :, :1].contiguous()
    for codec in (get_codec("L1"), get_codec("L1", group_size=1)):
        for chunk in (one, kv):
            out = codec.decode(codec.encode(chunk, layout), layout)
            assert out.shape == chunk.shape
            bound = _documented_bound(chunk, out, layout, codec.spec.max_alpha(layout))
            assert bool((out.float() - chunk.float()).abs().le(bound).all())


def test_constant_and_zero_chunks_are_exact(layout):
    for value in (0.0, 3.5):
        kv = torch.full(layout.shape(12), value, dtype=torch.float16)
        codec = get_codec("L3")
        assert torch.equal(codec.decode(codec.encode(kv, layout), layout), kv)


def test_bad_input_is_rejected(kv, layout):
    codec = get_codec("L2")
    with pytest.raises(ValueError, match="non-finite"):
        bad = kv.clone()
        bad[0, 0, 3, 0, 0] = float("inf")
        codec.encode(bad, layout)
    with pytest.raises(ValueError, match="shape"):
        codec.encode(kv[:, :, :, :1], layout)
    with pytest.raises(ValueError, match="dtype"):
        codec.encode(kv.float(), layout)
    with pytest.raises(ValueError, match="no tokens"):
        codec.encode(kv[:, :, :0], layout)


def _documented_bound(kv, out, layout: KVLayout, alpha: float) -> torch.Tensor:
    x = kv.float().reshape(layout.num_layers * 2, kv.shape[2], -1)  # [P, T, C]
    mean = x.mean(dim=1, keepdim=True).half().float()
    rms = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()  # [P, T, 1]
    channels = x.shape[-1]
    step = max(alpha, math.sqrt(channels) / MAX_SYMBOL) * rms * 2 ** 0.125 + 2 ** -14
    bound = step / 2 + 1e-6 * (x.abs() + mean.abs())  # float32 rounding of ref + q * step
    cast = out.float().abs().reshape(x.shape) * (2 ** -8 if out.dtype == torch.bfloat16 else 2 ** -11)
    return (bound + cast).reshape(kv.shape)


def test_step_exponents_round_up_to_the_grid():
    from kvstore.codec.quantize import MAX_STEP, MIN_STEP, exp_steps, step_exponents

    step = torch.tensor([MIN_STEP, 1e-9, 0.3, 1.0, 1.0905, 7e3, MAX_STEP, 1e9])
    exps = step_exponents(step)
    assert exps.dtype == torch.int16 and exps[3] == 0 and exps[0] == -112 and exps[-1] == 128
    grid = exp_steps(exps)
    clamped = step.clamp(MIN_STEP, MAX_STEP)
    assert bool((grid >= clamped).all()) and bool((grid <= clamped * 2 ** 0.125).all())
    with pytest.raises(ValueError, match="non-finite"):
        step_exponents(torch.tensor([float("nan")]))
