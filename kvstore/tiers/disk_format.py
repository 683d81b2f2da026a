"""The on-disk chunk file: a fixed 128-byte header, then the payload.

::

    offset  size  field
    ------  ----  ---------------------------------------------------------
         0     8  magic  b"KVCHUNK\\x01"
         8     2  format version (1)
        10     2  flags  (bit 0: payload is zstd-compressed)
        12     4  header size (128)
        16     8  layout fingerprint (KVLayout.fingerprint)
        24     4  chunk_tokens
        28     4  reserved (0)
        32     8  raw_len      bytes of the chunk once decoded
        40     8  payload_len  bytes that follow the header
        48     8  payload checksum (xxh3_64)
        56    32  chunk key (BlockHash digest)
        88    32  layout identity, ASCII, NUL-padded (for humans)
       120     8  header checksum (xxh3_64 of bytes 0..120)
       128     -  payload (payload_len bytes)

All integers little-endian. A file is valid only if both checksums match,
the layout and chunk size are this store's, and the file is exactly
``128 + payload_len`` bytes long.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVCHUNK\x01"
VERSION = 1
HEADER_SIZE = 128
FLAG_ZSTD = 1

_BODY = struct.Struct("<8sHHIQIIQQQ32s32s")  # bytes 0..120
_TAIL = struct.Struct("<Q")
assert _BODY.size + _TAIL.size == HEADER_SIZE


class CorruptChunk(ValueError):
    """A chunk file failed a structural or checksum check."""


def checksum(data) -> int:
    """Payload checksum: xxh3_64 (far faster than any disk)."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class ChunkHeader:
    key: bytes
    layout_fingerprint: int
    layout_identity: str
    chunk_tokens: int
    raw_len: int
    payload_len: int
    payload_checksum: int
    flags: int = 0

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.payload_len

    def pack(self) -> bytes:
        body = _BODY.pack(
            MAGIC, VERSION, self.flags, HEADER_SIZE, self.layout_fingerprint,
            self.chunk_tokens, 0, self.raw_len, self.payload_len, self.payload_checksum,
            self.key, self.layout_identity.encode("ascii")[:32],
        )
        return body + _TAIL.pack(checksum(body))

    @classmethod
    def unpack(cls, buf) -> "ChunkHeader":
        """Parse and check a header; raises :class:`CorruptChunk`."""
        buf = bytes(buf[:HEADER_SIZE])
        if len(buf) < HEADER_SIZE:
            raise CorruptChunk(f"header truncated ({len(buf)} bytes)")
        (stored,) = _TAIL.unpack_from(buf, _BODY.size)
        if checksum(buf[: _BODY.size]) != stored:
            raise CorruptChunk("header checksum mismatch")
        (magic, version, flags, hsize, fp, tokens, _r, raw_len, payload_len, csum, key,
         ident) = _BODY.unpack_from(buf)
        if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE:
            raise CorruptChunk(f"bad magic/version {magic!r} v{version}")
        return cls(key, fp, ident.rstrip(b"\0").decode("ascii", "replace"), tokens,
                   raw_len, payload_len, csum, flags)
