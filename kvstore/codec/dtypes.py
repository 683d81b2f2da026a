"""A layout's torch dtype, and the chunk shape checks every encoder runs."""

from __future__ import annotations

import torch

from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import TORCH_DTYPES
from kvstore.codec.hint import EncodeHint


def torch_dtype(layout: KVLayout) -> torch.dtype:
    return TORCH_DTYPES[layout.dtype]


def check_chunk(kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> int:
    """Validate an encoder's input (and its hint, if any); return its number of tokens.

    Raises:
        ValueError: wrong rank, shape or dtype for ``layout``, no tokens, or a hint
            whose importance is not ``[num_layers, num_tokens]``, finite and >= 0.
    """
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        raise ValueError(f"kv must be a 5-d tensor [layers, 2, tokens, heads, dim], got {type(kv)}")
    num_tokens = kv.shape[2]
    if tuple(kv.shape) != layout.shape(num_tokens):
        raise ValueError(f"kv shape {tuple(kv.shape)} does not match {layout.identity}")
    if num_tokens == 0:
        raise ValueError("kv chunk holds no tokens")
    if kv.dtype != torch_dtype(layout):
        raise ValueError(f"kv dtype {kv.dtype} does not match layout dtype {layout.dtype}")
    if hint is not None:
        hint.check(layout.num_layers, num_tokens)
    return num_tokens
