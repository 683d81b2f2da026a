"""Chunk keys: the chained hash of each chunk's last block.

A chunk of ``chunk_tokens`` tokens spans ``chunk_tokens // block_size``
hashed blocks; its key is the chained :class:`BlockHash` of the last one, so
a key implies the whole prefix before it (and the model, tenant and adapter,
which seed the chain). A trailing partial chunk has no key.
"""

from __future__ import annotations

from typing import Sequence

from kvcluster.common.hashing import BlockHash, ExtraKeys, hash_blocks
from kvcluster.common.layout import KVLayout


def chunk_keys(
    token_ids: Sequence[int], layout: KVLayout, extra: ExtraKeys, chunk_tokens: int = 256
) -> list[BlockHash]:
    """Keys of every full chunk of ``token_ids``, in prefix order."""
    blocks_per_chunk = _blocks_per_chunk(layout.block_size, chunk_tokens)
    block_hashes = hash_blocks(token_ids, layout.block_size, extra)
    return chunk_keys_from_block_hashes(block_hashes, blocks_per_chunk)


def chunk_keys_from_block_hashes(
    block_hashes: Sequence[BlockHash], blocks_per_chunk: int
) -> list[BlockHash]:
    """Every ``blocks_per_chunk``-th block hash (the last block of each chunk)."""
    if blocks_per_chunk <= 0:
        raise ValueError(f"blocks_per_chunk must be positive, got {blocks_per_chunk}")
    return list(block_hashes[blocks_per_chunk - 1 :: blocks_per_chunk])


def _blocks_per_chunk(block_size: int, chunk_tokens: int) -> int:
    if chunk_tokens <= 0 or chunk_tokens % block_size:
        raise ValueError(
            f"chunk_tokens ({chunk_tokens}) must be a positive multiple of block_size ({block_size})"
        )
    return chunk_tokens // block_size
