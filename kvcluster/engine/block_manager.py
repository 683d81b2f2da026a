"""The one owner of the paged pool's blocks: free list, reference counts and hash registry.

Every block is got and freed here (nano-vllm's ``BlockManager``, vLLM's ``BlockPool``):
the engine's scheduler, the received-KV sink and the store loader all allocate through
one instance, so a block's registration can never outlive its contents.

Free list: blocks are handed out from its head and returned to its tail, so the order
is exact and testable. A fresh manager of 4 blocks gives ``[0, 1]`` then ``[2]``;
freeing ``[1, 0]`` makes the next allocation ``[3, 1]``.

Registry: a full block, once computed, may be registered under its chained hash
(:func:`kvcluster.common.hashing.hash_blocks`). A block whose last reference is
dropped stays registered while it sits in the free list, so a later prompt with the
same prefix revives it (:meth:`match` then :meth:`share`); :meth:`allocate` forgets a
block's registration at the moment it hands the block out, whoever asks, because its
KV is about to be overwritten. The registry thus holds as much as the free pool
allows, the least recently freed block going first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from kvcluster.common.hashing import BlockHash


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs right now."""


class BlockManager:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}

    # ------------------------------------------------------------ free list

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list in hand-out order."""
        return list(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` fresh blocks from the head of the free list (ref count 1).

        Each one's registration, if it had one, is forgotten: its KV is about to change.

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
            self._forget(block_id)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; at 0 it goes to the free list's tail
        (still registered, so it can be revived until it is handed out again)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is already free")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    # ------------------------------------------------------------ registry

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or waiting in the free list)."""
        return len(self._block_of)

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest registered prefix of ``hashes`` (no reference taken)."""
        block_ids = []
        for block_hash in hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def can_share(self, block_ids: Sequence[int], num_new_blocks: int) -> bool:
        """True when ``block_ids`` can be shared and ``num_new_blocks`` allocated besides
        (sharing a free block takes it out of the free list)."""
        revived = sum(1 for b in block_ids if self._ref_counts[b] == 0)
        return num_new_blocks <= self.num_free - revived

    def share(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block; a free block leaves the free list."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def cache_full_blocks(self, hashes: Sequence[BlockHash], block_ids: Sequence[int]) -> None:
        """Register computed full blocks: ``block_ids[i]`` holds the block hashed ``hashes[i]``.

        A hash already registered keeps its block (two requests computed the same
        prefix: the first stays); a block already registered keeps its hash, which is
        then the same one (it was matched under it).
        """
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes for {len(block_ids)} blocks")
        for block_hash, block_id in zip(hashes, block_ids):
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is free: only blocks in use can be cached")
            known = self._hash_of.get(block_id)
            if known is not None:
                assert known == block_hash, f"block {block_id} is registered under another hash"
                continue
            if block_hash not in self._block_of:
                self._block_of[block_hash] = block_id
                self._hash_of[block_id] = block_hash

    def reset_prefix_cache(self) -> int:
        """Forget the registration of every free block (vLLM's ``reset_prefix_cache``):
        later prompts recompute or load from the kvstore. Blocks in use keep theirs.
        Returns how many registrations were dropped."""
        free = [b for b in self._hash_of if self._ref_counts[b] == 0]
        for block_id in free:
            self._forget(block_id)
        return len(free)

    # ------------------------------------------------------------ private

    def _forget(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id, None)
        if block_hash is not None:
            del self._block_of[block_hash]

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
