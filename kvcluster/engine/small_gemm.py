"""Few-row matmuls against panel-packed fp32 or bf16 weights, in C (``native/small_gemm.c``).

Decode multiplies a handful of rows (one per sequence) by every weight matrix,
so its speed is the speed at which the weights stream from memory. The kernel
reads each weight once per step for up to :func:`rows_per_pass` rows from a
copy packed into contiguous column panels, and splits the panels over
:func:`num_threads` threads (the GIL is released during the call): its own helper
threads, not torch's OpenMP pool, so it may use every core of a process that
keeps torch itself at one thread (as Ray does for its actors). bf16
weights halve the bytes streamed; they are widened to fp32 exactly and multiplied
with fp32 rows into fp32 results.

Compiled once per machine with ``-march=native`` (see :mod:`kvcluster.native`);
:func:`available` is False without a compiler, off x86-64, or with
``KVCLUSTER_SMALL_GEMM=0``, and callers then keep torch's matmuls.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcluster.native import load_library

SOURCE = Path(__file__).with_name("native") / "small_gemm.c"
FLAGS = ("-O3", "-march=native", "-pthread")
DISABLE_ENV = "KVCLUSTER_SMALL_GEMM"


def available() -> bool:
    return _lib() is not None


def rows_per_pass() -> int:
    """Rows multiplied in one pass over the weights (more rows take more passes)."""
    return _lib().sg_rows_per_pass()


PACKED_DTYPES = (torch.float32, torch.bfloat16)
_threads = 0


def set_num_threads(num_threads: int) -> None:
    """Threads each matmul is split over; 0: ``torch.get_num_threads()``."""
    global _threads
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    _threads = num_threads


def num_threads() -> int:
    return _threads or torch.get_num_threads()


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """``weight_t [K, N]`` (fp32 or bf16) as contiguous column panels ``[ceil(N / P), K, P]``
    in its own dtype.

    P is the kernel's panel width; the last panel is zero-padded.
    """
    assert weight_t.dtype in PACKED_DTYPES, weight_t.dtype
    k, n = weight_t.shape
    width = _lib().sg_panel_width()
    padded = F.pad(weight_t, (0, -n % width))  # [K, panels * P]
    return padded.view(k, -1, width).transpose(0, 1).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x [M, K] @ W [K, out_features] -> [M, out_features]`` (fp32) with W as :func:`pack`
    made it; ``x`` is widened to fp32 first when it is not."""
    x = x.float().contiguous()  # a CPU tensor, as packed (from pack: contiguous)
    m, k = x.shape
    assert packed.shape[1] == k, (x.shape, packed.shape)
    y = x.new_empty(m, out_features)
    fn = _lib().sg_matmul_bf16 if packed.dtype == torch.bfloat16 else _lib().sg_matmul
    fn(x.data_ptr(), m, k, k, packed.data_ptr(), out_features, y.data_ptr(), out_features,
       num_threads())
    return y


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, DISABLE_ENV)
    if lib is None:
        return None
    for fn in (lib.sg_matmul, lib.sg_matmul_bf16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                       ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                       ctypes.c_int]
    return lib
