"""In-process prefix reuse: chained block hash -> paged-cache block id.

A full block, once computed, is registered under its chained hash
(:func:`kvcluster.common.hashing.hash_blocks`, seeded with the model id), so a
later prompt that starts with the same blocks shares them instead of
recomputing. Sharing is by reference count in the :class:`BlockAllocator`.

A block whose last reference is dropped stays registered while it sits in the
free list; it is forgotten only when the allocator hands it out again. So the
cache holds as much as the free pool allows, evicting the least recently freed
block first.
"""

from __future__ import annotations

from kvcluster.common.hashing import BlockHash, ExtraKeys, hash_block, root_hash
from kvcluster.engine.block_allocator import BlockAllocator
from kvcluster.engine.sequence import Sequence


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, block_size: int, extra: ExtraKeys):
        self.allocator = allocator
        self.block_size = block_size
        self.extra = extra
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}

    def __len__(self) -> int:
        return len(self._block_of)

    def block_hashes(self, token_ids: list[int], start: int = 0,
                     parent: BlockHash | None = None) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``token_ids`` from block ``start`` on."""
        parent = parent or root_hash(self.extra)
        hashes = []
        bs = self.block_size
        for begin in range(start * bs, len(token_ids) - bs + 1, bs):
            parent = hash_block(parent, token_ids[begin : begin + bs])
            hashes.append(parent)
        return hashes

    def match(self, hashes: list[BlockHash]) -> list[int]:
        """Block ids of the longest registered prefix of ``hashes`` (no reference taken)."""
        block_ids = []
        for block_hash in hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def num_free_after_sharing(self, block_ids: list[int]) -> int:
        """Free blocks left once ``block_ids`` are shared (free ones leave the free list)."""
        revived = sum(1 for b in block_ids if self.allocator.ref_count(b) == 0)
        return self.allocator.num_free - revived

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks; any of them still registered is forgotten (its KV is about to change)."""
        block_ids = self.allocator.allocate(num_blocks)
        for block_id in block_ids:
            block_hash = self._hash_of.pop(block_id, None)
            if block_hash is not None:
                del self._block_of[block_hash]
        return block_ids

    def register(self, seq: Sequence, hashes: list[BlockHash],
                 root: BlockHash | None = None) -> None:
        """Register ``seq``'s newly computed full blocks.

        ``hashes`` holds the hashes of the blocks registered so far for ``seq``
        and is extended in place. ``root`` seeds the chain (a per-request tenant
        salt); None: this cache's own extra keys.
        """
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= len(hashes):
            return
        new = self.block_hashes(seq.token_ids[: num_full * self.block_size], start=len(hashes),
                                parent=hashes[-1] if hashes else root)
        for block_hash, block_id in zip(new, seq.block_table[len(hashes) : num_full]):
            if block_hash not in self._block_of and block_id not in self._hash_of:
                self._block_of[block_hash] = block_id
                self._hash_of[block_id] = block_hash
        hashes += new
