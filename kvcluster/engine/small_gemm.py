"""Few-row matmuls against panel-packed fp32 or bf16 weights, in C (``native/small_gemm.c``).

Decode multiplies a handful of rows (one per sequence) by every weight matrix,
so its speed is the speed at which the weights stream from memory. The kernel
reads each weight once per step for up to :func:`rows_per_pass` rows from a
copy packed into contiguous column panels, and splits the panels over
:func:`num_threads` threads (the GIL is released during the call): its own helper
threads, not torch's OpenMP pool, so it may use every core of a process that
keeps torch itself at one thread (as Ray does for its actors). bf16
weights halve the bytes streamed; they are widened to fp32 exactly and multiplied
with fp32 rows into fp32 results. On a CPU with AMX, bf16 rows times bf16 weights
run on the tile unit instead (:func:`amx_available`) from :data:`AMX_MIN_ROWS`
rows on: a prefill's tens of rows then cost about one pass over the weights,
where the FMA path takes one pass per :func:`rows_per_pass` rows.

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


@functools.cache
def amx_available() -> bool:
    """Whether bf16 rows can be multiplied on AMX tiles (the CPU has them, the build
    uses them and the OS granted this process the tile state)."""
    return _lib() is not None and bool(_lib().sg_amx_available())


PACKED_DTYPES = (torch.float32, torch.bfloat16)
AMX_MIN_ROWS = 2
"""From this many bf16 rows on, AMX beats the FMA path (one row streams the weights
at the same speed either way; docs/benchmarks.md, "engine")."""
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
    """``weight_t [K, N]`` as contiguous column panels in its own dtype: fp32
    ``[ceil(N / P), K, P]``; bf16 ``[ceil(N / P), ceil(K / 2), P, 2]``, rows 2i and
    2i + 1 interleaved (the pair layout AMX tiles read; native/small_gemm.c).

    P is the kernel's panel width; the last panel (and an odd K's last pair) is
    zero-padded.
    """
    assert weight_t.dtype in PACKED_DTYPES, weight_t.dtype
    k, n = weight_t.shape
    width = _lib().sg_panel_width()
    if weight_t.dtype == torch.float32:
        padded = F.pad(weight_t, (0, -n % width))  # [K, panels * P]
        return padded.view(k, -1, width).transpose(0, 1).contiguous()
    padded = F.pad(weight_t, (0, -n % width, 0, k % 2))  # [2 * pairs, panels * P]
    pairs = padded.view(-1, 2, padded.shape[1] // width, width)  # [pairs, 2, panels, P]
    return pairs.permute(2, 0, 3, 1).contiguous()  # [panels, pairs, P, 2]


def packed_in_features(packed: torch.Tensor) -> int:
    """K as rounded up by :func:`pack` (an odd K of bf16 weights reads as K + 1)."""
    return packed.shape[1] * (2 if packed.dim() == 4 else 1)


def matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x [M, K] @ W [K, out_features] -> [M, out_features]`` with W as :func:`pack`
    made it. bf16 ``x`` with bf16 W and enough rows runs on AMX (:func:`uses_amx`);
    otherwise ``x`` is widened to fp32 (exactly, from bf16) first.

    Sums are fp32; ``out_dtype`` bf16 (bf16 W only) rounds them as ``.to(torch.bfloat16)``
    would, in the kernel.
    """
    if out_dtype not in (torch.float32, packed.dtype):
        raise ValueError(f"out_dtype {out_dtype} with {packed.dtype} weights")
    m, k = x.shape
    assert packed_in_features(packed) - k in (0, 1 if packed.dim() == 4 else 0), \
        (x.shape, packed.shape)
    if uses_amx(x, packed):
        fn, x = _lib().sg_matmul_bf16_amx, x.contiguous()
    else:
        x = x.float().contiguous()  # a CPU tensor, as packed (from pack: contiguous)
        fn = _lib().sg_matmul_bf16 if packed.dtype == torch.bfloat16 else _lib().sg_matmul
    y = torch.empty(m, out_features, dtype=out_dtype)
    args = [x.data_ptr(), m, k, k, packed.data_ptr(), out_features, y.data_ptr(), out_features,
            num_threads()]
    fn(*args, *([out_dtype == torch.bfloat16] if packed.dtype == torch.bfloat16 else []))
    return y


def uses_amx(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether :func:`matmul` of ``x`` by ``packed`` runs on AMX tiles."""
    return (x.dtype == packed.dtype == torch.bfloat16 and x.shape[0] >= AMX_MIN_ROWS
            and x.shape[1] % _lib().sg_amx_k_multiple() == 0 and amx_available())


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, DISABLE_ENV)
    if lib is None:
        return None
    args = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,  # x, m, k, ldx
            ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,  # W, n, y, ldy
            ctypes.c_int]  # threads
    for fn, extra in ((lib.sg_matmul, []), (lib.sg_matmul_bf16, [ctypes.c_int]),  # y_bf16
                      (lib.sg_matmul_bf16_amx, [ctypes.c_int])):
        fn.restype = None
        fn.argtypes = args + extra
    return lib
