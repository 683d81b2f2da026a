"""Load ``planes.c`` (the codecs' single-pass row kernels), compiled once per machine.

Without a compiler, off x86-64, or with ``KVSTORE_CODEC_NATIVE=0``,
:func:`available` is False and the codecs keep their torch twins, which give
the same tensors bit for bit (tests/codec/test_planes_native.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kvcluster.native import load_library
from kvstore.codec.native import DISABLE_ENV

SOURCE = Path(__file__).with_name("planes.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off")
"""No implicit FMA contraction: the kernels fuse (fmaf) exactly where torch's kernels do."""
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    return _lib() is not None


def usable(channels: int) -> bool:
    """The kernels can take rows of ``channels`` (C = kv_heads * head_dim) here."""
    return available() and channels <= _lib().kv_max_channels()


def dequantize(symbols: torch.Tensor, where: torch.Tensor, mean: torch.Tensor, steps: torch.Tensor,
               refs: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """Rows of ``out [P, T, C]`` as quantize.dequantize builds them, from ``symbols [R, C]``
    int8 in stream order (row (p, t) is ``symbols[where[p * T + t]]``), ``mean [P, C]`` and
    ``steps [P, T]`` float32, ``refs [P, T]`` uint8 (valid: the caller checked them)."""
    planes, tokens, channels = out.shape
    _check(out, symbols, where, mean, steps, refs)
    assert symbols.shape[1] == channels and where.numel() == planes * tokens
    assert where.dtype == torch.int64 and (where.numel() == 0 or (
        int(where.min()) >= 0 and int(where.max()) < symbols.shape[0])), "rows out of range"
    status = _lib().kv_dequantize(symbols.data_ptr(), where.data_ptr(), mean.data_ptr(),
                                  steps.data_ptr(), refs.data_ptr(), planes, tokens, channels,
                                  group_size, out.data_ptr(), KINDS[out.dtype])
    if status != 0:
        raise ValueError("refs hold an anchor row coded against an anchor, or an unknown kind")


def convert(src: torch.Tensor, out: torch.Tensor, head_dim: int,
            tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``out[...] = src`` in ``out``'s dtype, planes ``[P, T, C]``; with ``tables`` (cos and
    signed sin ``[T, C]`` float32, transform._tables) the key planes also get RoPE."""
    planes, tokens, channels = src.shape
    cos, sin = tables if tables is not None else (None, None)
    _check(src, out, *(t for t in (cos, sin) if t is not None))
    assert out.shape == src.shape and (cos is None or cos.shape == (tokens, channels))
    status = _lib().kv_convert_planes(src.data_ptr(), KINDS[src.dtype], out.data_ptr(),
                                      KINDS[out.dtype], planes, tokens, channels, head_dim,
                                      None if cos is None else cos.data_ptr(),
                                      None if sin is None else sin.data_ptr())
    if status != 0:
        raise ValueError(f"planes {tuple(src.shape)} with head_dim {head_dim} do not fit the kernel")


def row_peaks(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last axis of float32 ``x [P, T, C]`` (rows contiguous) -> ``[P, T]``."""
    planes, tokens, channels = x.shape
    _check_rows(x)
    peaks = torch.empty(planes, tokens)
    _lib().kv_row_peaks(x.data_ptr(), planes, tokens, channels, x.stride(0), peaks.data_ptr())
    return peaks


def quantize_rows(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """int8 ``clamp(round(x / steps[..., None]), -127, 127)`` of float32 ``x [P, T, C]``
    (rows contiguous), ``steps [P, T]`` float32."""
    planes, tokens, channels = x.shape
    _check_rows(x)
    _check(steps)
    symbols = torch.empty(x.shape, dtype=torch.int8)
    _lib().kv_quantize_rows(x.data_ptr(), planes, tokens, channels, x.stride(0), steps.data_ptr(),
                            symbols.data_ptr())
    return symbols


def rows_contiguous(x: torch.Tensor) -> bool:
    """float32 ``x [P, T, C]`` whose rows lie back to back within each plane (planes may
    be apart, as in quantize's padded scratch)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(2) == 1 \
        and x.stride(1) == x.shape[2]


def _check_rows(x: torch.Tensor) -> None:
    assert rows_contiguous(x), (x.dtype, x.shape, x.stride())


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == "cpu" and t.is_contiguous(), (t.device, t.shape, t.stride())


@functools.cache
def _lib():
    lib = load_library(SOURCE, FLAGS, DISABLE_ENV)
    return None if lib is None else bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' signatures on a loaded planes.c (tests load other builds)."""
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for name, restype, argtypes in (
            ("kv_max_channels", n, []),
            ("kv_dequantize", i, [p, p, p, p, p, n, n, n, n, p, i]),
            ("kv_convert_planes", i, [p, i, p, i, n, n, n, n, p, p]),
            ("kv_row_peaks", None, [p, n, n, n, n, p]),
            ("kv_quantize_rows", None, [p, n, n, n, n, p, p])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
