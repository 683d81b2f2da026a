"""Frames of the tcp data plane: a fixed header, then the bytes of one stripe.

A chunk's write is split into stripes, each sent on one of the sender's
connections to the receiver; every stripe is one frame:

    0      4    5    6      8                 24         32         40         48         56
    +------+----+----+------+-----------------+----------+----------+----------+----------+
    | KVDP | v1 | 1  | 0    | token (16 B)    | write id | write    | stripe   | stripe   | stripe bytes ...
    |      |    |DATA| flags|                 |          | length   | offset   | length   |
    +------+----+----+------+-----------------+----------+----------+----------+----------+
      all integers little-endian; offsets are bytes into the transfer's window

The receiver checks the whole header (magic, version, kind, flags, the token of
a live transfer, the stripe inside that transfer's window and inside
``MAX_WRITE_BYTES``) *before* it reads the stripe's bytes into the window;
anything wrong closes the connection, so nothing lands where it should not.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"KVDP"
VERSION = 1
KIND_DATA = 1
TOKEN_BYTES = 16
_HEADER = struct.Struct("<4sBBH16sQQQQ")
HEADER_BYTES = _HEADER.size
MAX_WRITE_BYTES = 1 << 40
"""No single write is larger (a guard against nonsense lengths)."""


class FramingError(ValueError):
    """A frame header that is not one we could have sent."""


@dataclass(frozen=True)
class FrameHeader:
    token: bytes
    write_id: int
    write_length: int
    """Bytes of the whole write (all its stripes)."""
    stripe_offset: int
    """Where this stripe's bytes go in the window."""
    stripe_length: int

    def pack(self) -> bytes:
        check(self)
        return _HEADER.pack(MAGIC, VERSION, KIND_DATA, 0, self.token, self.write_id,
                            self.write_length, self.stripe_offset, self.stripe_length)


def parse(data: bytes | bytearray | memoryview) -> FrameHeader:
    """The header in ``data`` (exactly HEADER_BYTES); FramingError if malformed."""
    if len(data) != HEADER_BYTES:
        raise FramingError(f"frame header has {len(data)} bytes, expected {HEADER_BYTES}")
    magic, version, kind, flags, token, write_id, write_length, offset, length = \
        _HEADER.unpack(data)
    if magic != MAGIC:
        raise FramingError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FramingError(f"unsupported version {version}")
    if kind != KIND_DATA or flags != 0:
        raise FramingError(f"unknown frame kind {kind} / flags {flags}")
    header = FrameHeader(token, write_id, write_length, offset, length)
    check(header)
    return header


def check(header: FrameHeader) -> None:
    if len(header.token) != TOKEN_BYTES:
        raise FramingError(f"token must be {TOKEN_BYTES} bytes")
    if not 0 < header.write_length <= MAX_WRITE_BYTES:
        raise FramingError(f"write length {header.write_length} out of range")
    if not 0 < header.stripe_length <= header.write_length:
        raise FramingError(f"stripe length {header.stripe_length} not in "
                           f"(0, {header.write_length}]")
    if header.stripe_offset > MAX_WRITE_BYTES:
        raise FramingError(f"stripe offset {header.stripe_offset} out of range")
    if header.write_id >= 1 << 64:
        raise FramingError("write id out of range")


def stripes(offset: int, length: int, num_stripes: int, min_stripe_bytes: int
            ) -> list[tuple[int, int]]:
    """Split [offset, offset + length) into at most ``num_stripes`` (offset, length)
    pieces of at least ``min_stripe_bytes`` (the last may be shorter)."""
    count = max(1, min(num_stripes, length // max(min_stripe_bytes, 1)))
    step = -(-length // count)
    return [(offset + start, min(step, length - start)) for start in range(0, length, step)]
