"""Names of the compute/KV dtypes the engine supports, mapped to torch dtypes."""

from __future__ import annotations

import torch

from kvcluster.common.layout import DTYPE_SIZES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
"""The one map from dtype names (the layout's, the config's) to torch dtypes."""


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or a torch dtype) -> ``torch.bfloat16``; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype} (supported: {sorted(TORCH_DTYPES)})")
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (supported: {sorted(TORCH_DTYPES)})")
    return TORCH_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")
