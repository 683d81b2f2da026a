"""Reference-counted allocation of paged-cache block ids from a free list.

Free blocks are handed out from the head of the free list and returned to its
tail, so the order is exact and testable: a fresh allocator of 4 blocks gives
``[0, 1]`` then ``[2]``; freeing ``[1, 0]`` makes the next allocation ``[3, 1]``.

A block whose reference count drops to 0 goes back to the free list but keeps
its contents until it is handed out again, which lets a prefix cache revive it
with :meth:`BlockAllocator.share` (removing it from the free list).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list in hand-out order."""
        return list(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free list (ref count 1).

        Raises:
            OutOfBlocksError: fewer than ``num_blocks`` blocks are free.
        """
        if not self.can_allocate(num_blocks):
            raise OutOfBlocksError(
                f"need {num_blocks} KV blocks, only {self.num_free} of {self.num_blocks} free"
            )
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block; a free block leaves the free list."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; at 0 it goes to the free list's tail."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is already free")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
