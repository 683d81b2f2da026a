"""Chained, seeded prefix-block hashes, identical on every process and machine.

A block's key must imply its whole prefix *and* who may reuse it, so the chain
starts from a root seeded with the extra keys (model id, tenant cache salt,
adapter id); every block hash is then SHA-256 of (parent hash, block tokens).

Canonical byte encoding (all integers little-endian)::

    root  = SHA256("kvcluster/block-hash/v1" 0x00 | u32 len | model_id
                   | u32 len | tenant_salt | u32 len | adapter_id)
    block = SHA256(parent(32 bytes) | u32 num_tokens | u32 token_id * num_tokens)

Never Python's ``hash()``: it is salted per process (PYTHONHASHSEED), which is
how a router silently sees a 0% hit rate.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Sequence

HASH_VERSION = 1
_DOMAIN = b"kvcluster/block-hash/v1\x00"
_U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class ExtraKeys:
    """What besides the tokens decides whether KV may be reused."""

    model_id: str
    tenant_salt: str = ""
    """Tenant cache salt; "" is the explicit opt-in shared namespace."""
    adapter_id: str = ""

    def encode(self) -> bytes:
        parts = (self.model_id, self.tenant_salt, self.adapter_id)
        out = bytearray()
        for part in parts:
            raw = part.encode("utf-8")
            out += struct.pack("<I", len(raw)) + raw
        return bytes(out)


@dataclass(frozen=True, slots=True)
class BlockHash:
    """The chained (sequence) hash of a block: it implies every block before it."""

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError(f"BlockHash digest must be 32 bytes, got {len(self.digest)}")

    @property
    def u64(self) -> int:
        """64-bit form for indexes and events (first 8 bytes, little-endian)."""
        return int.from_bytes(self.digest[:8], "little")

    def hex(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"BlockHash({self.digest[:8].hex()}…)"


def tokens_hash(token_ids: Sequence[int]) -> int:
    """A block's own (unchained) 64-bit hash: equal token ids, equal value.

    A different type (int) from :class:`BlockHash` on purpose: it says nothing
    about the prefix, so it must never be used as a cache key.
    """
    digest = hashlib.sha256(_encode_tokens(token_ids)).digest()
    return int.from_bytes(digest[:8], "little") & _U64_MASK


def root_hash(extra: ExtraKeys) -> BlockHash:
    """The parent of the first block of every sequence under ``extra``."""
    return BlockHash(hashlib.sha256(_DOMAIN + extra.encode()).digest())


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one block given its parent's hash."""
    h = hashlib.sha256(parent.digest)
    h.update(_encode_tokens(token_ids))
    return BlockHash(h.digest())


def hash_blocks(
    token_ids: Sequence[int], block_size: int, extra: ExtraKeys,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids``.

    A trailing partial block has no hash: it can still change, so it is never
    cached or advertised.

    Args:
        parent: the hash of the block just before ``token_ids[0]``, to extend a chain
            already hashed up to there; None: ``token_ids`` starts the sequence
            (its chain starts at ``root_hash(extra)``).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parent = parent or root_hash(extra)
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def chunk_hashes(
    token_ids: Sequence[int], block_size: int, chunk_tokens: int, extra: ExtraKeys
) -> list[BlockHash]:
    """Keys of every full chunk: the chained hash of each chunk's last block.

    A chunk key therefore implies its whole prefix (and the model, tenant and
    adapter that seed the chain); a trailing partial chunk has no key. The one
    chunk-key function: the kvstore keys its chunks with it and the router (which
    must not import the store) computes exactly the keys the store announces.

    Raises:
        ValueError: ``chunk_tokens`` is not a positive multiple of ``block_size``.
    """
    if chunk_tokens <= 0 or chunk_tokens % block_size:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be a positive multiple of "
                         f"block_size ({block_size})")
    step = chunk_tokens // block_size
    return hash_blocks(token_ids, block_size, extra)[step - 1 :: step]


def _encode_tokens(token_ids: Sequence[int]) -> bytes:
    arr = array("I")
    try:
        arr.fromlist(list(token_ids))
    except OverflowError as exc:
        raise ValueError("token ids must be in [0, 2**32)") from exc
    if sys.byteorder == "big":
        arr.byteswap()
    return struct.pack("<I", len(arr)) + arr.tobytes()
