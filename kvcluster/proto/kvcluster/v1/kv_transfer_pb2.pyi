from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_CODE_UNSPECIFIED: _ClassVar[StreamCode]
    STREAM_CODE_OK: _ClassVar[StreamCode]
    STREAM_CODE_RECOMPUTED: _ClassVar[StreamCode]
    STREAM_CODE_FAILED: _ClassVar[StreamCode]
STREAM_CODE_UNSPECIFIED: StreamCode
STREAM_CODE_OK: StreamCode
STREAM_CODE_RECOMPUTED: StreamCode
STREAM_CODE_FAILED: StreamCode

class KVStreamMessage(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    chunk: KVChunk
    end: StreamEnd
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("request_id", "layout_identity", "num_chunks", "num_tokens", "token_ids", "slo_ms", "chunk_tokens", "data_plane")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout_identity: str
    num_chunks: int
    num_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    slo_ms: float
    chunk_tokens: int
    data_plane: DataPlaneOffer
    def __init__(self, request_id: _Optional[str] = ..., layout_identity: _Optional[str] = ..., num_chunks: _Optional[int] = ..., num_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., slo_ms: _Optional[float] = ..., chunk_tokens: _Optional[int] = ..., data_plane: _Optional[_Union[DataPlaneOffer, _Mapping]] = ...) -> None: ...

class DataPlaneOffer(_message.Message):
    __slots__ = ("planes", "node_id")
    PLANES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    planes: _containers.RepeatedScalarFieldContainer[str]
    node_id: str
    def __init__(self, planes: _Optional[_Iterable[str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class DataRef(_message.Message):
    __slots__ = ("offset", "length", "write_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    write_id: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., write_id: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("request_id", "index", "token_start", "token_end", "level", "token_ids", "checksum", "attempt", "part", "num_parts", "chunk_bytes", "data", "payload")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_start: int
    token_end: int
    level: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    checksum: int
    attempt: int
    part: int
    num_parts: int
    chunk_bytes: int
    data: DataRef
    payload: bytes
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., level: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., checksum: _Optional[int] = ..., attempt: _Optional[int] = ..., part: _Optional[int] = ..., num_parts: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., data: _Optional[_Union[DataRef, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("num_chunks_sent",)
    NUM_CHUNKS_SENT_FIELD_NUMBER: _ClassVar[int]
    num_chunks_sent: int
    def __init__(self, num_chunks_sent: _Optional[int] = ...) -> None: ...

class KVStreamReply(_message.Message):
    __slots__ = ("ack", "nak", "status", "grant", "released")
    ACK_FIELD_NUMBER: _ClassVar[int]
    NAK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    ack: ChunkAck
    nak: ChunkNak
    status: StreamStatus
    grant: DataPlaneGrant
    released: ChunkReleased
    def __init__(self, ack: _Optional[_Union[ChunkAck, _Mapping]] = ..., nak: _Optional[_Union[ChunkNak, _Mapping]] = ..., status: _Optional[_Union[StreamStatus, _Mapping]] = ..., grant: _Optional[_Union[DataPlaneGrant, _Mapping]] = ..., released: _Optional[_Union[ChunkReleased, _Mapping]] = ...) -> None: ...

class DataPlaneGrant(_message.Message):
    __slots__ = ("plane", "token", "window_bytes", "address", "num_connections", "segment", "remote_address", "reason")
    PLANE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    plane: str
    token: bytes
    window_bytes: int
    address: str
    num_connections: int
    segment: str
    remote_address: int
    reason: str
    def __init__(self, plane: _Optional[str] = ..., token: _Optional[bytes] = ..., window_bytes: _Optional[int] = ..., address: _Optional[str] = ..., num_connections: _Optional[int] = ..., segment: _Optional[str] = ..., remote_address: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ChunkReleased(_message.Message):
    __slots__ = ("index", "attempt")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    index: int
    attempt: int
    def __init__(self, index: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("index", "attempt", "payload_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    attempt: int
    payload_bytes: int
    def __init__(self, index: _Optional[int] = ..., attempt: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ChunkNak(_message.Message):
    __slots__ = ("index", "attempt", "reason", "resend")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESEND_FIELD_NUMBER: _ClassVar[int]
    index: int
    attempt: int
    reason: str
    resend: bool
    def __init__(self, index: _Optional[int] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., resend: _Optional[bool] = ...) -> None: ...

class StreamStatus(_message.Message):
    __slots__ = ("code", "message", "num_chunks_decoded", "num_chunks_recomputed", "payload_bytes", "elapsed_s", "decode_overlap_s", "decode_total_s", "decode_speeds", "prefill_tokens_per_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_DECODED_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_OVERLAP_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_SPEEDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    code: StreamCode
    message: str
    num_chunks_decoded: int
    num_chunks_recomputed: int
    payload_bytes: int
    elapsed_s: float
    decode_overlap_s: float
    decode_total_s: float
    decode_speeds: _containers.RepeatedCompositeFieldContainer[LevelSpeed]
    prefill_tokens_per_s: float
    def __init__(self, code: _Optional[_Union[StreamCode, str]] = ..., message: _Optional[str] = ..., num_chunks_decoded: _Optional[int] = ..., num_chunks_recomputed: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., decode_overlap_s: _Optional[float] = ..., decode_total_s: _Optional[float] = ..., decode_speeds: _Optional[_Iterable[_Union[LevelSpeed, _Mapping]]] = ..., prefill_tokens_per_s: _Optional[float] = ...) -> None: ...

class LevelSpeed(_message.Message):
    __slots__ = ("level", "tokens_per_s")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    level: str
    tokens_per_s: float
    def __init__(self, level: _Optional[str] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class ReceiverInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReceiverInfo(_message.Message):
    __slots__ = ("layout_identities", "levels", "prefill_tokens_per_s", "max_message_bytes", "decode_speeds")
    LAYOUT_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_SPEEDS_FIELD_NUMBER: _ClassVar[int]
    layout_identities: _containers.RepeatedScalarFieldContainer[str]
    levels: _containers.RepeatedScalarFieldContainer[str]
    prefill_tokens_per_s: float
    max_message_bytes: int
    decode_speeds: _containers.RepeatedCompositeFieldContainer[LevelSpeed]
    def __init__(self, layout_identities: _Optional[_Iterable[str]] = ..., levels: _Optional[_Iterable[str]] = ..., prefill_tokens_per_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., decode_speeds: _Optional[_Iterable[_Union[LevelSpeed, _Mapping]]] = ...) -> None: ...
