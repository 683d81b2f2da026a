"""Names of the compute/KV dtypes the engine supports, mapped to torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
