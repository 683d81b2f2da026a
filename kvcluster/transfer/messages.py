"""Our own types for the KV streaming protocol (pure Python, no torch, no protobuf).

The generated protobuf classes never leave :mod:`kvcluster.proto.convert`;
everything else in :mod:`kvcluster.transfer` speaks these dataclasses.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import xxhash

TEXT_LEVEL = "text"
"""Level name of a chunk sent as token ids, to be recomputed by the receiver."""
INLINE_PLANE = "grpc"
"""Data plane name of payloads carried inline in the gRPC stream."""


class ProtocolError(ValueError):
    """A peer broke the protocol (no header first, unknown layout, bad header, ...)."""


class StreamCode(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    RECOMPUTED = 2
    """Complete, but some chunks were recomputed from tokens."""
    FAILED = 3


@dataclass(frozen=True)
class DataPlaneOffer:
    """The data planes a sender can write chunk payloads over, preferred first."""

    planes: tuple[str, ...] = ()
    node_id: str = ""
    """The sender's node: equal on both ends means shared memory is possible."""


@dataclass(frozen=True)
class DataRef:
    """Where a chunk's payload lies in the window the receiver granted."""

    offset: int
    length: int
    write_id: int = 0
    """The sender's id of this write (tcp: names the data frames that carry it)."""


@dataclass(frozen=True)
class StreamHeader:
    request_id: str
    layout_identity: str
    num_chunks: int
    num_tokens: int
    token_ids: tuple[int, ...]
    """Every token of the request: the receiver recomputes what never arrives."""
    chunk_tokens: int
    """Chunk i covers tokens [i * chunk_tokens, min((i + 1) * chunk_tokens, num_tokens))."""
    slo_ms: float = 0.0
    data_plane: DataPlaneOffer | None = None
    """None: the sender sends every payload inline."""

    def token_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.num_tokens)


@dataclass(frozen=True)
class ChunkFrame:
    """One message on the wire: part ``part`` of chunk ``index``."""

    request_id: str
    index: int
    token_start: int
    token_end: int
    level: str
    token_ids: tuple[int, ...] = ()
    """Only for ``level == TEXT_LEVEL``."""
    checksum: int = 0
    attempt: int = 0
    part: int = 0
    num_parts: int = 1
    chunk_bytes: int = 0
    payload: bytes | memoryview = b""
    data: DataRef | None = None
    """Set when the payload went over the data plane (``payload`` is then empty)."""

    @property
    def is_text(self) -> bool:
        return self.level == TEXT_LEVEL

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def checksum_ok(self) -> bool:
        return frame_checksum(self.payload, self.token_ids) == self.checksum


@dataclass(frozen=True)
class StreamEnd:
    num_chunks_sent: int


@dataclass(frozen=True)
class ChunkAck:
    index: int
    attempt: int
    payload_bytes: int


@dataclass(frozen=True)
class ChunkNak:
    index: int
    attempt: int
    reason: str
    resend: bool
    """False: the receiver recomputes the chunk itself; do not send it again."""


@dataclass(frozen=True)
class DataPlaneGrant:
    """The receiver's answer to a header's offer: how this transfer's payloads travel."""

    plane: str
    """"grpc": inline in the stream."""
    token: bytes = b""
    """One-time token of this transfer (tcp: every data frame carries it)."""
    window_bytes: int = 0
    """Registered bytes lent to this transfer; DataRef offsets lie in [0, window_bytes)."""
    address: str = ""
    """tcp: host:port of the data listener (empty host: the gRPC target's host);
    mooncake: the receiver engine's session id."""
    num_connections: int = 0
    segment: str = ""
    """shm: the shared-memory segment holding the window."""
    remote_address: int = 0
    """mooncake: the window's address in the receiver's registered memory."""
    reason: str = ""

    @property
    def inline(self) -> bool:
        return self.plane == INLINE_PLANE or self.window_bytes <= 0


@dataclass(frozen=True)
class ChunkReleased:
    """The receiver will not read this attempt's bytes in the window again."""

    index: int
    attempt: int


@dataclass(frozen=True)
class StreamStatus:
    code: StreamCode
    message: str = ""
    num_chunks_decoded: int = 0
    num_chunks_recomputed: int = 0
    payload_bytes: int = 0
    elapsed_s: float = 0.0
    decode_overlap_s: float = 0.0
    decode_total_s: float = 0.0
    decode_tokens_per_s: tuple[tuple[str, float], ...] = ()
    """(level, measured decode tokens/s) of the receiver, after this request."""
    prefill_tokens_per_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code in (StreamCode.OK, StreamCode.RECOMPUTED)


@dataclass(frozen=True)
class ReceiverInfo:
    layout_identities: tuple[str, ...] = ()
    levels: tuple[str, ...] = ()
    prefill_tokens_per_s: float = 0.0
    """Measured recompute speed of the receiver; 0 when unknown (never recompute)."""
    max_message_bytes: int = 0
    decode_tokens_per_s: tuple[tuple[str, float], ...] = ()
    """(level, measured decode tokens/s); levels not yet seen are absent."""

    def updated(self, status: "StreamStatus") -> "ReceiverInfo":
        """This info with the speeds a final status reported."""
        return ReceiverInfo(self.layout_identities, self.levels,
                            status.prefill_tokens_per_s or self.prefill_tokens_per_s,
                            self.max_message_bytes,
                            status.decode_tokens_per_s or self.decode_tokens_per_s)


SenderMessage = StreamHeader | ChunkFrame | StreamEnd
ReceiverMessage = ChunkAck | ChunkNak | StreamStatus | DataPlaneGrant | ChunkReleased


def frame_checksum(payload: bytes | memoryview, token_ids: tuple[int, ...] = ()) -> int:
    """XXH3-64 of the payload followed by the token ids (little-endian uint32).

    XXH3 rather than CRC-32: several times faster (docs/transfer.md, "Measurements
    behind the code"), and it is paid on every byte at both ends.
    """
    if not token_ids:
        return xxhash.xxh3_64_intdigest(payload)
    state = xxhash.xxh3_64(payload)
    state.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return state.intdigest()
