"""The one place where generated protobuf messages meet our own types.

``kvcluster.transfer.messages`` dataclasses <-> ``kv_transfer_pb2`` messages,
and straight to/from wire bytes for the streaming RPC, where chunk payloads are
large: a :class:`ChunkFrame` is serialised as its small metadata message plus
the payload appended unchanged (one copy, by ``bytes.join``), and parsed back
with the payload as a zero-copy ``memoryview`` of the received bytes. The bytes
are exactly what protobuf itself produces (payload is the highest field number,
so it is serialised last); ``tests/transfer/test_convert.py`` checks both ways.

    KVStreamMessage.chunk on the wire:
    +------+-----------+------------------------+------+-----------+---------+
    | 0x12 | varint n  | KVChunk fields 1..13   | 0x7a | varint p  | payload |
    +------+-----------+------------------------+------+-----------+---------+
      tag 2             metadata (protobuf)      tag 15              p bytes
"""

from __future__ import annotations

from kvcluster.proto.kvcluster.v1 import kv_transfer_pb2 as pb
from kvcluster.transfer.messages import (
    ChunkAck,
    ChunkFrame,
    ChunkNak,
    ChunkReleased,
    DataPlaneGrant,
    DataPlaneOffer,
    DataRef,
    ReceiverInfo,
    ReceiverMessage,
    SenderMessage,
    StreamCode,
    StreamEnd,
    StreamHeader,
    StreamStatus,
)

_CHUNK_TAG = b"\x12"    # KVStreamMessage.chunk: field 2, wire type 2
_PAYLOAD_TAG = b"\x7a"  # KVChunk.payload: field 15, wire type 2
_PAYLOAD_FIELD = 15


# ---------------------------------------------------------------- wire bytes


def encode_sender_message(msg: SenderMessage) -> bytes:
    """Serialise a header, chunk frame or end marker as a ``KVStreamMessage``."""
    if isinstance(msg, ChunkFrame):
        return _encode_chunk_frame(msg)
    return sender_to_proto(msg).SerializeToString()


def decode_sender_message(data: bytes) -> SenderMessage:
    """Parse a ``KVStreamMessage``; a chunk's payload is a view of ``data``."""
    if data[:1] == _CHUNK_TAG:
        frame = _decode_chunk_frame(data)
        if frame is not None:
            return frame
    return sender_from_proto(pb.KVStreamMessage.FromString(data))


def encode_receiver_message(msg: ReceiverMessage) -> bytes:
    return receiver_to_proto(msg).SerializeToString()


def decode_receiver_message(data: bytes) -> ReceiverMessage:
    return receiver_from_proto(pb.KVStreamReply.FromString(data))


def encode_info(info: ReceiverInfo) -> bytes:
    return info_to_proto(info).SerializeToString()


def decode_info(data: bytes) -> ReceiverInfo:
    return info_from_proto(pb.ReceiverInfo.FromString(data))


# ---------------------------------------------------------------- messages


def sender_to_proto(msg: SenderMessage) -> pb.KVStreamMessage:
    if isinstance(msg, StreamHeader):
        return pb.KVStreamMessage(header=pb.StreamHeader(
            request_id=msg.request_id, layout_identity=msg.layout_identity,
            num_chunks=msg.num_chunks, num_tokens=msg.num_tokens,
            token_ids=msg.token_ids, chunk_tokens=msg.chunk_tokens, slo_ms=msg.slo_ms,
            data_plane=_offer_to_proto(msg.data_plane)))
    if isinstance(msg, ChunkFrame):
        return pb.KVStreamMessage(chunk=_chunk_to_proto(msg, bytes(msg.payload)))
    if isinstance(msg, StreamEnd):
        return pb.KVStreamMessage(end=pb.StreamEnd(num_chunks_sent=msg.num_chunks_sent))
    raise TypeError(f"not a sender message: {type(msg).__name__}")


def sender_from_proto(message: pb.KVStreamMessage) -> SenderMessage:
    kind = message.WhichOneof("kind")
    if kind == "header":
        h = message.header
        offer = (DataPlaneOffer(tuple(h.data_plane.planes), h.data_plane.node_id)
                 if h.HasField("data_plane") else None)
        return StreamHeader(h.request_id, h.layout_identity, h.num_chunks, h.num_tokens,
                            tuple(h.token_ids), h.chunk_tokens, h.slo_ms, offer)
    if kind == "chunk":
        return _chunk_from_proto(message.chunk, message.chunk.payload)
    if kind == "end":
        return StreamEnd(message.end.num_chunks_sent)
    raise ValueError("KVStreamMessage carries no header, chunk or end")


def receiver_to_proto(msg: ReceiverMessage) -> pb.KVStreamReply:
    if isinstance(msg, ChunkAck):
        return pb.KVStreamReply(ack=pb.ChunkAck(
            index=msg.index, attempt=msg.attempt, payload_bytes=msg.payload_bytes))
    if isinstance(msg, ChunkNak):
        return pb.KVStreamReply(nak=pb.ChunkNak(
            index=msg.index, attempt=msg.attempt, reason=msg.reason, resend=msg.resend))
    if isinstance(msg, StreamStatus):
        return pb.KVStreamReply(status=pb.StreamStatus(
            code=int(msg.code), message=msg.message,
            num_chunks_decoded=msg.num_chunks_decoded,
            num_chunks_recomputed=msg.num_chunks_recomputed,
            payload_bytes=msg.payload_bytes, elapsed_s=msg.elapsed_s,
            decode_overlap_s=msg.decode_overlap_s, decode_total_s=msg.decode_total_s,
            decode_speeds=_speeds_to_proto(msg.decode_tokens_per_s),
            prefill_tokens_per_s=msg.prefill_tokens_per_s))
    if isinstance(msg, DataPlaneGrant):
        return pb.KVStreamReply(grant=pb.DataPlaneGrant(
            plane=msg.plane, token=msg.token, window_bytes=msg.window_bytes,
            address=msg.address, num_connections=msg.num_connections, segment=msg.segment,
            remote_address=msg.remote_address, reason=msg.reason))
    if isinstance(msg, ChunkReleased):
        return pb.KVStreamReply(released=pb.ChunkReleased(index=msg.index, attempt=msg.attempt))
    raise TypeError(f"not a receiver message: {type(msg).__name__}")


def receiver_from_proto(reply: pb.KVStreamReply) -> ReceiverMessage:
    kind = reply.WhichOneof("kind")
    if kind == "ack":
        return ChunkAck(reply.ack.index, reply.ack.attempt, reply.ack.payload_bytes)
    if kind == "nak":
        n = reply.nak
        return ChunkNak(n.index, n.attempt, n.reason, n.resend)
    if kind == "status":
        s = reply.status
        return StreamStatus(StreamCode(s.code), s.message, s.num_chunks_decoded,
                            s.num_chunks_recomputed, s.payload_bytes, s.elapsed_s,
                            s.decode_overlap_s, s.decode_total_s,
                            _speeds_from_proto(s.decode_speeds), s.prefill_tokens_per_s)
    if kind == "grant":
        g = reply.grant
        return DataPlaneGrant(g.plane, g.token, g.window_bytes, g.address, g.num_connections,
                              g.segment, g.remote_address, g.reason)
    if kind == "released":
        return ChunkReleased(reply.released.index, reply.released.attempt)
    raise ValueError("KVStreamReply carries no ack, nak, status, grant or release")


def info_to_proto(info: ReceiverInfo) -> pb.ReceiverInfo:
    return pb.ReceiverInfo(layout_identities=info.layout_identities, levels=info.levels,
                           prefill_tokens_per_s=info.prefill_tokens_per_s,
                           max_message_bytes=info.max_message_bytes,
                           decode_speeds=_speeds_to_proto(info.decode_tokens_per_s))


def info_from_proto(info: pb.ReceiverInfo) -> ReceiverInfo:
    return ReceiverInfo(tuple(info.layout_identities), tuple(info.levels),
                        info.prefill_tokens_per_s, info.max_message_bytes,
                        _speeds_from_proto(info.decode_speeds))


def _speeds_to_proto(speeds) -> list[pb.LevelSpeed]:
    return [pb.LevelSpeed(level=level, tokens_per_s=tps) for level, tps in speeds]


def _speeds_from_proto(speeds) -> tuple[tuple[str, float], ...]:
    return tuple((s.level, s.tokens_per_s) for s in speeds)


# ---------------------------------------------------------------- chunk fast path


def _offer_to_proto(offer: DataPlaneOffer | None) -> pb.DataPlaneOffer | None:
    if offer is None:
        return None
    return pb.DataPlaneOffer(planes=offer.planes, node_id=offer.node_id)


def _chunk_to_proto(frame: ChunkFrame, payload: bytes) -> pb.KVChunk:
    data = frame.data
    return pb.KVChunk(
        request_id=frame.request_id, index=frame.index, token_start=frame.token_start,
        token_end=frame.token_end, level=frame.level,
        token_ids=frame.token_ids, checksum=frame.checksum, attempt=frame.attempt,
        part=frame.part, num_parts=frame.num_parts, chunk_bytes=frame.chunk_bytes,
        data=None if data is None else pb.DataRef(offset=data.offset, length=data.length,
                                                  write_id=data.write_id),
        payload=payload)


def _chunk_from_proto(chunk: pb.KVChunk, payload: bytes | memoryview) -> ChunkFrame:
    data = (DataRef(chunk.data.offset, chunk.data.length, chunk.data.write_id)
            if chunk.HasField("data") else None)
    return ChunkFrame(
        request_id=chunk.request_id, index=chunk.index, token_start=chunk.token_start,
        token_end=chunk.token_end, level=chunk.level,
        token_ids=tuple(chunk.token_ids), checksum=chunk.checksum, attempt=chunk.attempt,
        part=chunk.part, num_parts=chunk.num_parts, chunk_bytes=chunk.chunk_bytes,
        payload=payload, data=data)


def _encode_chunk_frame(frame: ChunkFrame) -> bytes:
    meta = _chunk_to_proto(frame, b"").SerializeToString()
    size = len(frame.payload)
    if size == 0:  # proto3 omits an empty bytes field
        return b"".join((_CHUNK_TAG, _varint(len(meta)), meta))
    tail = _PAYLOAD_TAG + _varint(size)
    body_len = len(meta) + len(tail) + size
    return b"".join((_CHUNK_TAG, _varint(body_len), meta, tail, frame.payload))


def _decode_chunk_frame(data: bytes) -> ChunkFrame | None:
    """Parse a chunk message; None when it is not in the simple form (use protobuf)."""
    view = memoryview(data)
    body_len, pos = _read_varint(view, 1)
    if pos + body_len != len(view):
        return None
    fields = _scan_fields(view, pos, len(view))
    if fields is None:
        return None
    meta_spans, payload_span = fields
    meta = b"".join(view[a:b] for a, b in meta_spans)
    payload = view[payload_span[0]:payload_span[1]] if payload_span else b""
    return _chunk_from_proto(pb.KVChunk.FromString(meta), payload)


def _scan_fields(view: memoryview, pos: int, end: int):
    """Split a KVChunk body into metadata spans and the payload span (one at most)."""
    meta_spans: list[tuple[int, int]] = []
    payload_span = None
    while pos < end:
        start = pos
        tag, pos = _read_varint(view, pos)
        field_number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            if field_number == _PAYLOAD_FIELD:
                if payload_span is not None:
                    return None
                payload_span = (pos, pos + length)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            return None
        if pos > end:
            raise ValueError("truncated KVChunk")
        if field_number != _PAYLOAD_FIELD:
            meta_spans.append((start, pos))
    return meta_spans, payload_span


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = view[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7
