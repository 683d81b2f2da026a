"""The paged KV cache: one preallocated pool of fixed-size blocks.

Pool shape (one tensor for the whole model)::

    [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]

A token's *slot* is ``block_id * block_size + offset``: the model writes new
K/V by slot (``pool[layer]`` viewed as ``[2, num_slots, num_kv_heads, head_dim]``)
and gathers whole blocks by block table, one indexing op each.

``export_blocks`` / ``import_blocks`` move the KV of a list of blocks in the
layout's byte order ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
(see :mod:`kvcluster.common.layout`), which is what the store, the codec and
the network carry.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import torch_dtype


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.dtype = torch_dtype(layout.dtype)
        # [L, 2, num_blocks, block_size, H_kv, D]
        self.pool = torch.zeros(
            (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim),
            dtype=self.dtype,
            device=self.device,
        )

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def export_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KV of ``block_ids`` in layout byte order.

        Returns:
            A new contiguous tensor ``[L, 2, len(block_ids) * block_size, H_kv, D]``
            on the cache's device and dtype.
        """
        index = self._index(block_ids)
        blocks = self.pool.index_select(2, index)  # [L, 2, n, block_size, H_kv, D]
        return blocks.view(self.layout.shape(len(block_ids) * self.block_size))

    def import_blocks(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` (as produced by :meth:`export_blocks`) into ``block_ids``.

        Raises:
            ValueError: wrong shape or dtype, bad or repeated block ids.
        """
        expected = self.layout.shape(len(block_ids) * self.block_size)
        if tuple(kv.shape) != expected:
            raise ValueError(
                f"import_blocks: kv has shape {tuple(kv.shape)}, expected {expected} "
                f"for {len(block_ids)} blocks of layout {self.layout.identity}"
            )
        if kv.dtype != self.dtype:
            raise ValueError(f"import_blocks: kv dtype {kv.dtype}, expected {self.dtype}")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"import_blocks: repeated block ids in {list(block_ids)}")
        index = self._index(block_ids)
        blocks = kv.to(self.device).reshape(
            *self.pool.shape[:2], len(block_ids), *self.pool.shape[3:]
        )  # [L, 2, n, block_size, H_kv, D]
        self.pool.index_copy_(2, index, blocks)

    def _index(self, block_ids: Sequence[int]) -> torch.Tensor:
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
