"""``x @ w`` for the engine's ``[in, out]`` weight matrices, optionally via a packed copy.

Decode multiplies few rows (one per sequence) by every weight, so it runs at
the speed the weights stream from memory. On one core the native few-row kernel
of :mod:`kvcluster.engine.small_gemm` on a panel-packed copy streams the weights
fastest, then a oneDNN-packed copy, then MKL's plain ``x @ w`` (at 8 rows; the
native kernel stays ahead up to 64 rows). Measured GB/s: docs/benchmarks.md,
"engine".

So a packed copy is made at load (doubling the weight memory, hence optional:
``EngineConfig.cpu_packed_weights``): the native kernel's panels where it
builds, else oneDNN's blocked layout (used for 2+ rows only: one row is
faster through MKL). Packed paths round differently from a plain matmul
(max |diff| of SmolLM2 decode logits, up to ~33 in magnitude: 7e-5 native,
8e-5 oneDNN); plain ``x @ w`` gives exactly transformers' fp32 logits, so an
fp32 prefill keeps it. bf16 rows on a CPU with AMX go through the native panels
for any number of rows (the tile unit; ``ModelRunner.packed_prefill``), and the
kernel rounds their results to bf16 itself.
"""

from __future__ import annotations

import torch

from kvcluster.engine import small_gemm

ONEDNN_BATCH_HINT = 8
"""Rows the oneDNN packed layout is tuned for (the batched-decode case)."""
NATIVE_MAX_ROWS = 64
"""Up to this many rows the native kernel beat MKL and oneDNN (measured at 1-128)."""


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:  # only the native kernel reads bf16 panels
        return small_gemm.available()
    return weight.dtype == torch.float32 and (
        small_gemm.available() or torch.backends.mkldnn.is_available()
    )


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """A packed copy of ``weight_t [in, out]`` for :func:`matmul`: native panels
    ``[panels, in, P]``, or else an opaque oneDNN tensor."""
    if small_gemm.available():
        return small_gemm.pack(weight_t)
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.T.contiguous(), ONEDNN_BATCH_HINT)


def matmul(x: torch.Tensor, weight_t: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """``x [T, in] @ weight_t [in, out] -> [T, out]``; via ``packed`` where that is faster."""
    rows = x.shape[0]
    if packed is None:
        return x @ weight_t
    if packed.is_mkldnn:
        if rows == 1:
            return x @ weight_t
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [None], "")
    if rows > NATIVE_MAX_ROWS and not small_gemm.uses_amx(x, packed):
        return x @ weight_t
    out_dtype = x.dtype if x.dtype == packed.dtype else torch.float32  # bf16: rounded in C
    return small_gemm.matmul(x, packed, weight_t.shape[1], out_dtype).to(x.dtype)
