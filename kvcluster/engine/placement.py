"""Where the engine runs and in what dtype, when the config says "auto".

``dtype: auto`` picks what the hardware computes natively and fast: bf16 on CUDA and on
CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), fp32 on other CPUs. fp16 on a
CPU is honoured only when asked for, with a warning: CPUs have no fast fp16 matmul, so
torch emulates it and serving becomes many times slower (docs/benchmarks.md, engine).
"""

from __future__ import annotations

import logging

import torch

from kvcluster.common.layout import DTYPE_SIZES

log = logging.getLogger(__name__)

DTYPES = ("auto", *DTYPE_SIZES)
"""What ``model.dtype`` accepts."""


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The compute and KV dtype for ``dtype`` (one of :data:`DTYPES`) on ``device``.

    Raises:
        ValueError: an unknown dtype.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    is_cpu = torch.device(device).type == "cpu"
    if dtype == "auto":
        return "bfloat16" if not is_cpu or cpu_has_native_bf16() else "float32"
    if dtype == "float16" and is_cpu:
        log.warning("model.dtype float16 on a CPU: CPUs have no fast fp16 matmul and torch "
                    "emulates it, so prefill and decode run many times slower than in "
                    "bfloat16 or float32; use dtype auto (bfloat16 where the CPU has it)")
    return dtype


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
