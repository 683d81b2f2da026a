"""``x @ w`` for the engine's ``[in, out]`` weight matrices, optionally via oneDNN.

On CPU, few-row fp32 matmuls (batched decode) run up to ~1.4x faster against a
weight pre-packed into oneDNN's blocked format than through MKL's ``x @ w``, and
they keep scaling with 2 threads on a busy machine where MKL's do not; for a
single row (batch-1 decode) plain ``x @ w`` on a contiguous ``[in, out]`` matrix
is fastest, and for a long prefill the two are even. Plain ``x @ w`` gives
exactly transformers' fp32 logits; the packed path rounds differently (~1e-4 on
SmolLM2), so only batched decode uses it. The packed copy doubles the weight
memory, hence optional (``EngineConfig.cpu_packed_weights``).
"""

from __future__ import annotations

import torch

PACK_BATCH_HINT = 8
"""Rows the packed layout is tuned for (the batched-decode case)."""


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def pack(weight_t: torch.Tensor) -> torch.Tensor:
    """oneDNN-packed copy of ``weight_t [in, out]`` (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_t.T.contiguous(), PACK_BATCH_HINT)


def matmul(x: torch.Tensor, weight_t: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """``x [T, in] @ weight_t [in, out] -> [T, out]``; via ``packed`` when given and T > 1."""
    if packed is not None and x.shape[0] > 1:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [None], "")
    return x @ weight_t
