"""The native few-row matmul kernel against torch (fp64 reference): the FMA path, the
AMX path for many bf16 rows, the bf16 pair layout, and the fallbacks of cpu_linear
when it is disabled."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvcluster.engine import cpu_linear, small_gemm
from kvcluster.native import _local_includes, load_library

needs_native = pytest.mark.skipif(not small_gemm.available(),
                                  reason="no C compiler / not x86-64: torch path only")
SHAPES = [(1, 1), (5, 7), (64, 32), (576, 960), (33, 100), (1536, 577), (7, 49)]


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double()).float()


def _tolerance(x: torch.Tensor, w: torch.Tensor) -> float:
    """fp32 accumulation error bound scale: eps * K * max |x| * max |w|, generously."""
    return 4 * 2**-23 * x.shape[1] * x.abs().max().item() * w.abs().max().item()


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 8, 9, 17])
def test_matches_fp64_reference_for_any_rows_and_tails(m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x, w = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    y = small_gemm.matmul(x, small_gemm.pack(w), n)
    assert y.shape == (m, n)
    assert (y - _reference(x, w)).abs().max().item() <= _tolerance(x, w)


@needs_native
def test_packed_panels_are_zero_padded_columns():
    w = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    packed = small_gemm.pack(w)  # [1, 3, P]
    width = packed.shape[2]
    assert packed.shape == (1, 3, width) and width >= 5
    assert torch.equal(packed[0, :, :5], w) and packed[0, :, 5:].eq(0).all()


@needs_native
def test_thread_count_does_not_change_the_result():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, 576, generator=gen), torch.randn(576, 3000, generator=gen)
    packed, threads = small_gemm.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_gemm.matmul(x, packed, 3000)
        torch.set_num_threads(2)
        two = small_gemm.matmul(x, packed, 3000)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_native
def test_non_contiguous_rows_are_accepted():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(64, 6, generator=gen).T, torch.randn(64, 40, generator=gen)  # x [6, 64]
    y = small_gemm.matmul(x, small_gemm.pack(w), 40)
    assert (y - _reference(x, w)).abs().max().item() <= _tolerance(x, w)


@needs_native
@pytest.mark.parametrize("rows", [1, 8, cpu_linear.NATIVE_MAX_ROWS + 1])
def test_cpu_linear_uses_the_native_panels(rows):
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(rows, 96, generator=gen), torch.randn(96, 70, generator=gen)
    packed = cpu_linear.pack(w)
    assert not packed.is_mkldnn and packed.shape[1] == 96
    y = cpu_linear.matmul(x, w, packed)
    assert (y - _reference(x, w)).abs().max().item() <= _tolerance(x, w)


def test_disabled_by_environment_falls_back_to_onednn(monkeypatch):
    monkeypatch.setenv(small_gemm.DISABLE_ENV, "0")
    small_gemm._lib.cache_clear()
    try:
        assert not small_gemm.available()
        gen = torch.Generator().manual_seed(6)
        x, w = torch.randn(4, 48, generator=gen), torch.randn(48, 33, generator=gen)
        assert cpu_linear.can_pack(w) == torch.backends.mkldnn.is_available()
        if cpu_linear.can_pack(w):
            packed = cpu_linear.pack(w)
            assert packed.is_mkldnn
            for rows in (1, 4):  # one row: plain x @ w; more: oneDNN
                got = cpu_linear.matmul(x[:rows], w, packed)
                assert (got - _reference(x[:rows], w)).abs().max().item() <= _tolerance(x, w)
    finally:
        monkeypatch.undo()
        small_gemm._lib.cache_clear()


@needs_native
def test_concurrent_callers_and_a_forked_child_get_exact_results():
    """Helper threads serve one caller at a time (others run alone); a forked
    child, which has none of the parent's helper threads, still computes."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(8, 576, generator=gen), torch.randn(576, 2048, generator=gen)
    packed, threads = small_gemm.pack(w), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = small_gemm.matmul(x, packed, 2048)  # starts the helpers
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: small_gemm.matmul(x, packed, 2048), range(32)))
        assert all(torch.equal(r, expected) for r in results)
        pid = os.fork()
        if pid == 0:  # child: exit status 0 only if the result is exact
            os._exit(0 if torch.equal(small_gemm.matmul(x, packed, 2048), expected) else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_bf16_panels_widen_exactly_and_multiply_in_fp32(m, k, n):
    """bf16 weights (half the bytes to stream) give the fp64 product of the same bf16
    values within fp32 accumulation error: the widening to fp32 is exact."""
    gen = torch.Generator().manual_seed(m * 7000 + k + n)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(k, n, generator=gen).bfloat16()
    packed = small_gemm.pack(w)
    assert packed.dtype == torch.bfloat16
    y = small_gemm.matmul(x, packed, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    reference = _reference(x.float(), w.float())
    assert (y - reference).abs().max().item() <= _tolerance(x.float(), w.float())


@needs_native
def test_cpu_linear_packs_bf16_weights_for_the_native_kernel():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 96, generator=gen).bfloat16()
    w = torch.randn(96, 70, generator=gen).bfloat16()
    assert cpu_linear.can_pack(w)
    y = cpu_linear.matmul(x, w, cpu_linear.pack(w))
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the fp32 result: within 2^-8 relative of the exact product
    reference = _reference(x.float(), w.float())
    assert ((y.float() - reference).abs() <= reference.abs() * 2**-8 + 1e-6).all()


def test_bf16_weights_are_not_packed_without_the_native_kernel(monkeypatch):
    monkeypatch.setenv(small_gemm.DISABLE_ENV, "0")
    small_gemm._lib.cache_clear()
    try:
        assert not cpu_linear.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    finally:
        monkeypatch.undo()
        small_gemm._lib.cache_clear()


def test_bf16_panels_interleave_row_pairs_and_pad_an_odd_k():
    w = torch.arange(3 * 5, dtype=torch.float32).view(3, 5).bfloat16()  # K = 3: one padded pair
    packed = small_gemm.pack(w)  # [1, 2, P, 2]
    width = packed.shape[2]
    assert packed.shape == (1, 2, width, 2) and small_gemm.packed_in_features(packed) == 4
    assert torch.equal(packed[0, 0, :5, 0], w[0]) and torch.equal(packed[0, 0, :5, 1], w[1])
    assert torch.equal(packed[0, 1, :5, 0], w[2]) and packed[0, 1, :, 1].eq(0).all()
    assert packed[0, :, 5:].eq(0).all()


needs_amx = pytest.mark.skipif(not (small_gemm.available() and small_gemm.amx_available()),
                               reason="no AMX tiles on this CPU (or no native kernel)")


@needs_amx
@pytest.mark.parametrize("k,n", [(32, 1), (64, 31), (576, 960), (1536, 577), (96, 70)])
@pytest.mark.parametrize("m", [2, 16, 17, 32, 33, 50])
def test_amx_rows_match_fp64_reference(m, k, n):
    """Many bf16 rows run on the tiles (row blocks of 16 and 32, partial column panels)
    and give the fp64 product of the same bf16 values within fp32 accumulation error."""
    gen = torch.Generator().manual_seed(m * 9000 + k + n)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(k, n, generator=gen).bfloat16()
    packed = small_gemm.pack(w)
    assert small_gemm.uses_amx(x, packed)
    y = small_gemm.matmul(x, packed, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    reference = _reference(x.float(), w.float())
    assert (y - reference).abs().max().item() <= _tolerance(x.float(), w.float())


@needs_amx
def test_amx_is_not_used_for_one_row_fp32_rows_or_a_ragged_k():
    w = torch.randn(576, 64).bfloat16()
    packed = small_gemm.pack(w)
    assert not small_gemm.uses_amx(torch.randn(1, 576).bfloat16(), packed)  # decode: FMA
    assert not small_gemm.uses_amx(torch.randn(8, 576), packed)  # fp32 rows
    ragged = small_gemm.pack(torch.randn(33, 64).bfloat16())
    assert not small_gemm.uses_amx(torch.randn(8, 33).bfloat16(), ragged)


@needs_amx
def test_amx_thread_count_and_concurrent_callers_do_not_change_the_result():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 576, generator=gen).bfloat16()
    packed = small_gemm.pack(torch.randn(576, 3000, generator=gen).bfloat16())
    before = small_gemm._threads
    try:
        small_gemm.set_num_threads(1)
        one = small_gemm.matmul(x, packed, 3000)
        small_gemm.set_num_threads(2)
        two = small_gemm.matmul(x, packed, 3000)
        with ThreadPoolExecutor(3) as pool:  # helper threads load their own tile config
            results = list(pool.map(lambda _: small_gemm.matmul(x, packed, 3000), range(12)))
    finally:
        small_gemm.set_num_threads(before)
    assert torch.equal(one, two) and all(torch.equal(r, one) for r in results)


@needs_amx
def test_cpu_linear_keeps_amx_beyond_the_fma_row_limit():
    gen = torch.Generator().manual_seed(10)
    rows = cpu_linear.NATIVE_MAX_ROWS + 100
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    w = torch.randn(96, 70, generator=gen).bfloat16()
    y = cpu_linear.matmul(x, w, cpu_linear.pack(w))
    reference = _reference(x.float(), w.float())
    assert ((y.float() - reference).abs() <= reference.abs() * 2**-8 + 1e-5).all()


def test_an_edited_included_header_rebuilds_the_library(tmp_path, monkeypatch):
    """small_gemm.c includes small_gemm_amx.h: the build's name hashes it too, so an
    edit of the header alone never loads a stale cached library."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source, header = tmp_path / "answer.c", tmp_path / "answer.h"
    source.write_text('#include "answer.h"\nint answer(void) { return ANSWER; }\n')
    header.write_text("#define ANSWER 41\n")
    first = load_library(source, ("-O1",), "TEST_NATIVE")
    if first is None:
        pytest.skip("not x86-64")
    header.write_text("#define ANSWER 42\n")
    assert first.answer() == 41 and load_library(source, ("-O1",), "TEST_NATIVE").answer() == 42
    assert small_gemm.SOURCE.with_name("small_gemm_amx.h") in _local_includes(small_gemm.SOURCE)


@needs_native
@pytest.mark.parametrize("m", [1, 3, 9, 17, 40])  # FMA passes, and AMX where it is there
def test_bf16_output_is_rounded_in_the_kernel_as_torch_rounds(m):
    gen = torch.Generator().manual_seed(11 + m)
    x = torch.randn(m, 576, generator=gen).bfloat16()
    w = (torch.randn(576, 333, generator=gen) * 3).bfloat16()
    w[:, 0] = float("inf")  # +-inf and NaN (inf - inf) columns round like torch too
    w[:7, 1], w[7:, 1] = float("inf"), float("-inf")
    packed = small_gemm.pack(w)
    y = small_gemm.matmul(x, packed, 333, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    expected = small_gemm.matmul(x, packed, 333).to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16)[:, 2:], expected.view(torch.int16)[:, 2:])
    assert torch.equal(y[:, :2].isnan(), expected[:, :2].isnan())
    assert torch.equal(y[:, :2].nan_to_num(0), expected[:, :2].nan_to_num(0))
    with pytest.raises(ValueError, match="out_dtype"):
        small_gemm.matmul(x.float(), small_gemm.pack(w.float()), 333, torch.bfloat16)
