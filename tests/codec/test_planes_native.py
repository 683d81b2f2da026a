"""The C row kernels (kvstore/codec/native/planes.c) against their torch twins.

Same inputs, same tensors: dequantized rows, RoPE and dtype casts, and whole
decodes. Tolerances are one float32 ulp (the kernels fuse multiply-adds exactly
where torch's vectorised addcmul does; a torch build that did not would differ
by that much); everything else must match exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcluster.native import load_library

from kvstore.codec import EncodeHint, get_codec
from kvstore.codec.native import planes_lib
from kvstore.codec.quantize import REF_ANCHOR, REF_MEAN, Quantized, dequantize
from kvstore.codec.transform import _rotate, _tables
from tests.codec.conftest import structured_kv
from tests.codec.test_transform import SMOLLM2

pytestmark = pytest.mark.skipif(not planes_lib.available(), reason="no C compiler for planes.c")
ULP = 2.0 ** -23


def _quantized(planes: int, tokens: int, channels: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    symbols = torch.randint(-127, 128, (planes, tokens, channels), dtype=torch.int8, generator=gen)
    mean = (torch.randn(planes, channels, generator=gen) * 30).half()
    exps = torch.randint(-60, 40, (planes, tokens), generator=gen).short()
    refs = torch.randint(0, 3, (planes, tokens), generator=gen).to(torch.uint8)
    refs[:, ::group] = torch.randint(0, 2, refs[:, ::group].shape, generator=gen).to(torch.uint8)
    return Quantized(mean, exps, refs, symbols)


@pytest.fixture(params=["native", "avx2", "baseline"])
def kernels(request, monkeypatch):
    """planes.c as shipped (-march=native), and built for AVX2 and for plain x86-64 (the
    other vector paths; each must give the same tensors)."""
    if request.param != "native":
        march = {"avx2": "-march=haswell", "baseline": "-march=x86-64"}[request.param]
        if request.param == "avx2" and "avx2" not in _cpu_flags():
            pytest.skip("this CPU lacks AVX2")
        flags = ("-O3", march, "-ffp-contract=off")
        lib = load_library(planes_lib.SOURCE, flags, planes_lib.DISABLE_ENV)
        assert lib is not None
        bound = planes_lib.bind(lib)
        monkeypatch.setattr(planes_lib, "_lib", lambda: bound)
    return request.param


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _torch_path(monkeypatch):
    monkeypatch.setattr(planes_lib, "available", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,group", [((4, 37, 24), 10), ((2, 5, 7), 1), ((6, 64, 192), 3)])
def test_dequantize_matches_torch(monkeypatch, kernels, dtype, shape, group):
    q = _quantized(*shape, group, seed=sum(shape))
    order = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(1))
    stream_order = Quantized(q.mean, q.step_exps, q.refs,
                             q.symbols.reshape(-1, shape[2])[order].contiguous())
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    native = dequantize(stream_order, group, dtype, rows=where)
    assert bool((q.refs == REF_ANCHOR).any()) == (group > 1) and bool((q.refs == REF_MEAN).any())
    _torch_path(monkeypatch)
    twin = dequantize(stream_order, group, dtype, rows=where)
    plain = dequantize(q, group, dtype)  # rows in plane order: the same tensor
    assert native.dtype == twin.dtype == dtype and native.shape == shape
    assert torch.equal(twin, plain)
    _assert_close(native, twin, dtype)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_dequantize_refuses_an_anchor_coded_against_an_anchor(monkeypatch, path):
    if path == "torch":
        _torch_path(monkeypatch)
    q = _quantized(2, 20, 8, 10, seed=0)
    dequantize(q, 10, torch.float32)
    q.refs[1, 10] = REF_ANCHOR
    with pytest.raises(ValueError, match="anchor"):
        dequantize(q, 10, torch.float32)


@pytest.mark.parametrize("src,dst", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                     (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("inverse", [False, True])
def test_convert_with_rope_matches_torch(kernels, src, dst, inverse):
    gen = torch.Generator().manual_seed(2)
    planes = (torch.randn(6, 33, 3 * 16, generator=gen) * 8).to(src)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    tables = _tables(inv_freq, 4000, 33, 3, inverse)
    out = torch.empty(planes.shape, dtype=dst)
    planes_lib.convert(planes, out, 16, tables)
    twin = planes.float()
    _rotate(twin, tables, 3)
    _assert_close(out, twin.to(dst), dst)
    assert torch.equal(out[1::2], planes[1::2].to(dst))  # value planes: only the cast
    plain = torch.empty(planes.shape, dtype=dst)
    planes_lib.convert(planes, plain, 16)
    assert torch.equal(plain, planes.to(dst))


@pytest.mark.parametrize("shape", [(3, 41, 24), (2, 7, 5), (4, 16, 192)])
def test_quantize_rows_match_torch(kernels, shape):
    gen = torch.Generator().manual_seed(shape[2])
    x = torch.randn(shape, generator=gen) * 20
    x[0, 0, :3] = torch.tensor([0.5, -2.5, 1.5])[:min(3, shape[2])] * 1.0  # ties round to even
    steps = torch.ones(shape[:2])
    steps[1:] = x[1:].abs().amax(-1) / 127 * (1 + torch.rand(shape[0] - 1, shape[1], generator=gen))
    peaks = planes_lib.row_peaks(x)
    assert torch.equal(peaks, torch.maximum(x.amax(-1), -x.amin(-1)))
    want = (x / steps.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    assert torch.equal(planes_lib.quantize_rows(x, steps), want)
    x[1, 2, shape[2] - 1] = float("nan")
    assert bool(planes_lib.row_peaks(x)[1, 2].isnan())  # the caller's finiteness check sees it
    padded = torch.randn(shape[0], shape[1] + 3, shape[2], generator=gen)[:, :shape[1]]  # planes apart
    assert torch.equal(planes_lib.row_peaks(padded), padded.abs().amax(-1))


def test_convert_refuses_a_head_dim_that_does_not_fit():
    planes = torch.zeros(2, 3, 12)
    with pytest.raises(ValueError, match="head_dim"):
        planes_lib.convert(planes, torch.empty_like(planes), 5)


@pytest.mark.parametrize("name", ["L0", "L5", "int8"])
@pytest.mark.parametrize("transform", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_streams_and_decodes_match_the_torch_path(monkeypatch, name, transform, dtype):
    layout = SMOLLM2.with_dtype(dtype)
    kv = structured_kv(layout, num_tokens=45, seed=4)
    codec = get_codec(name, transform=transform)
    hint = EncodeHint(position=1000)
    stream = codec.encode(kv, layout, hint)
    decoded = codec.decode(stream, layout)
    _torch_path(monkeypatch)
    assert codec.encode(kv, layout, hint) == stream
    _assert_close(decoded, codec.decode(stream, layout), kv.dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal, or one ulp of ``dtype`` apart (float32 rounding differences carried through)."""
    ulp = {torch.float32: ULP, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), rtol=ulp, atol=0)
