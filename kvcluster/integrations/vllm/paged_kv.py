"""vLLM's paged KV tensors <-> kvcluster's token-range layout.

vLLM hands a connector one tensor per attention layer (``register_kv_caches``); its
shape depends on the attention backend::

    CPU_ATTN (LBHNC)      [num_blocks, H, B, 2 * D]   per (block, head) in memory:
                                                      K rows [B, D], then V rows [B, D]
    FlashAttention (NHD)  [2, num_blocks, B, H, D]

kvcluster's byte order (kvcluster.common.layout) is ``[L, 2 (K, V), T, H, D]``. Loads and
saves move whole vLLM blocks only (the connector keeps every range block-aligned), so
each direction is one gather or scatter per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

CPU_LAYOUT = "cpu"
FLASH_LAYOUT = "flash"

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class PagedShape:
    """What a per-layer tensor must look like."""

    num_kv_heads: int
    head_dim: int
    block_size: int
    """Tokens per vLLM block (vLLM's cache_config.block_size)."""


class PagedKV:
    """The registered KV tensors of every attention layer, in layer order."""

    def __init__(self, layers: Sequence[torch.Tensor], shape: PagedShape, kind: str):
        if not layers:
            raise ValueError("no KV cache tensors registered")
        self.layers = list(layers)
        self.shape = shape
        self.kind = kind
        self._views = [_block_view(t, shape, kind) for t in self.layers]  # [nb, H, 2, B, D]
        self.dtype = self.layers[0].dtype
        self.device = self.layers[0].device

    @classmethod
    def from_kv_caches(cls, kv_caches: Mapping[str, torch.Tensor], shape: PagedShape
                       ) -> "PagedKV":
        """Order vLLM's ``{layer_name: tensor}`` by layer index and detect the layout.

        Raises:
            ValueError: a tensor of a shape neither layout explains (another backend).
        """
        names = sorted(kv_caches, key=_layer_index)
        first = kv_caches[names[0]]
        return cls([kv_caches[n] for n in names], shape, detect_kind(first, shape))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_blocks(self) -> int:
        return self._views[0].shape[0]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KV of whole blocks, ``[L, 2, len(block_ids) * B, H, D]``, in host memory
        (where the tiers and the transfer take it), whatever device vLLM's cache is on."""
        idx = self._index(block_ids)
        n, (B, H, D) = len(block_ids), (self.shape.block_size, self.shape.num_kv_heads,
                                        self.shape.head_dim)
        out = torch.empty((self.num_layers, 2, n * B, H, D), dtype=self.dtype)
        for layer, view in enumerate(self._views):
            blocks = view.index_select(0, idx)  # [n, H, 2, B, D]
            out[layer].view(2, n, B, H, D).copy_(blocks.permute(2, 0, 3, 1, 4))
        return out

    def scatter(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` ``[L, 2, len(block_ids) * B, H, D]`` into whole blocks."""
        idx = self._index(block_ids)
        n, (B, H, D) = len(block_ids), (self.shape.block_size, self.shape.num_kv_heads,
                                        self.shape.head_dim)
        expected = (self.num_layers, 2, n * B, H, D)
        if tuple(kv.shape) != expected:
            raise ValueError(f"KV of shape {tuple(kv.shape)} for {n} blocks, "
                             f"expected {expected}")
        kv = kv.to(device=self.device, dtype=self.dtype)
        for layer, view in enumerate(self._views):
            src = kv[layer].view(2, n, B, H, D).permute(1, 3, 0, 2, 4)  # [n, H, 2, B, D]
            view.index_copy_(0, idx, src.contiguous())

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = list(block_ids)
        if ids and (min(ids) < 0 or max(ids) >= self.num_blocks):
            raise ValueError(f"block ids out of range [0, {self.num_blocks}): {ids[:8]}...")
        return torch.as_tensor(ids, dtype=torch.long).to(self.device)


def detect_kind(tensor: torch.Tensor, shape: PagedShape) -> str:
    """Which backend layout ``tensor`` is in (see the module docstring)."""
    B, H, D = shape.block_size, shape.num_kv_heads, shape.head_dim
    dims = tuple(tensor.shape)
    if len(dims) == 4 and dims[1:] == (H, B, 2 * D):
        return CPU_LAYOUT
    if len(dims) == 5 and dims[0] == 2 and dims[2:] == (B, H, D):
        return FLASH_LAYOUT
    raise ValueError(f"unsupported vLLM KV cache tensor of shape {dims} for block_size={B}, "
                     f"num_kv_heads={H}, head_dim={D} (supported: CPU_ATTN "
                     f"[nb, H, B, 2D], FlashAttention NHD [2, nb, B, H, D])")


def _block_view(tensor: torch.Tensor, shape: PagedShape, kind: str) -> torch.Tensor:
    """A ``[num_blocks, H, 2, B, D]`` view (CPU) or permuted view (flash) of one layer."""
    B, H, D = shape.block_size, shape.num_kv_heads, shape.head_dim
    if kind == CPU_LAYOUT:
        return tensor.view(tensor.shape[0], H, 2, B, D)
    if kind == FLASH_LAYOUT:
        return tensor.permute(1, 3, 0, 2, 4)  # [2, nb, B, H, D] -> [nb, H, 2, B, D]
    raise ValueError(f"unknown paged layout {kind!r}")


def _layer_index(name: str) -> tuple[int, str]:
    match = _LAYER_INDEX.search(name)
    return (int(match.group(1)) if match else -1, name)
