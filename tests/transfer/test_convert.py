"""Round trips through the one conversion module, and its wire bytes against protobuf's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.proto import convert
from kvcluster.proto.kvcluster.v1 import kv_transfer_pb2 as pb
from kvcluster.transfer.messages import (
    ChunkAck, ChunkFrame, ChunkNak, ChunkReleased, DataPlaneGrant, DataPlaneOffer, DataRef,
    ReceiverInfo, StreamCode, StreamEnd, StreamHeader, StreamStatus, frame_checksum,
)

HEADER = StreamHeader("req-1", "L2-H2-D16-B4-float32", 3, 40, tuple(range(40)), 16, 250.0,
                      DataPlaneOffer(("shm", "tcp", "grpc"), "node-a"))
TEXT = ChunkFrame("req-1", 2, 32, 40, "text", tuple(range(32, 40)),
                  frame_checksum(b"", tuple(range(32, 40))))
DATA = ChunkFrame("req-1", 1, 16, 32, "int8", checksum=7, chunk_bytes=1 << 33,
                  data=DataRef(1 << 20, 1 << 33, 5))
RECEIVER_MESSAGES = [
    ChunkAck(3, 1, 1 << 33),
    ChunkNak(2, 0, "checksum mismatch", True),
    StreamStatus(StreamCode.RECOMPUTED, "sender silent", 7, 3, 12345, 0.5, 0.2, 0.3,
                 (("int8", 5000.0), ("lossless", 9000.5)), 321.0),
    DataPlaneGrant("tcp", b"\x07" * 16, 64 << 20, "127.0.0.1:5000", 4, "", 0, "other node"),
    DataPlaneGrant("shm", b"", 1 << 20, segment="kvdp-abc", reason="same node"),
    ChunkReleased(4, 1),
]


def _frame(payload: bytes, **kw) -> ChunkFrame:
    fields = dict(request_id="req-1", index=1, token_start=16, token_end=32, level="int8",
                  checksum=frame_checksum(payload), attempt=2, part=1,
                  num_parts=3, chunk_bytes=3 * len(payload))
    fields.update(kw)
    return ChunkFrame(payload=payload, **fields)


@pytest.mark.parametrize("msg", [HEADER, TEXT, DATA, StreamEnd(3), _frame(b"xyz" * 1000),
                                 StreamHeader("r", "L1", 1, 1, (5,), 1)])
def test_sender_messages_round_trip(msg):
    back = convert.decode_sender_message(convert.encode_sender_message(msg))
    if isinstance(msg, ChunkFrame):
        assert isinstance(back.payload, (memoryview, bytes))
        back = ChunkFrame(**{**back.__dict__, "payload": bytes(back.payload)})
    assert back == msg


@pytest.mark.parametrize("msg", RECEIVER_MESSAGES)
def test_receiver_messages_round_trip(msg):
    assert convert.decode_receiver_message(convert.encode_receiver_message(msg)) == msg


def test_receiver_info_round_trip():
    info = ReceiverInfo(("a", "b"), ("lossless", "int8"), 1234.5, 64 << 20,
                        (("int8", 10.0),))
    assert convert.decode_info(convert.encode_info(info)) == info
    assert convert.info_from_proto(convert.info_to_proto(info)) == info


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=3000), index=st.integers(0, 2**32 - 1),
       attempt=st.integers(0, 5), level=st.sampled_from(["lossless", "int8", "L0"]))
def test_fast_chunk_bytes_equal_protobuf_bytes(payload, index, attempt, level):
    frame = _frame(payload, index=index, attempt=attempt, level=level)
    fast = convert.encode_sender_message(frame)
    assert fast == convert.sender_to_proto(frame).SerializeToString()
    back = convert.decode_sender_message(fast)
    assert bytes(back.payload) == payload and back.index == index and back.checksum_ok()


def test_payload_is_a_view_of_the_received_bytes():
    data = convert.encode_sender_message(_frame(b"\x07" * 100_000))
    frame = convert.decode_sender_message(data)
    assert isinstance(frame.payload, memoryview) and frame.payload.obj is data


def test_decoder_accepts_any_field_order():
    """A peer may serialise the payload before the metadata; protobuf allows it."""
    frame = _frame(b"payload-first")
    chunk = convert.sender_to_proto(frame).chunk
    payload_only = pb.KVChunk(payload=chunk.payload).SerializeToString()
    chunk.ClearField("payload")
    body = payload_only + chunk.SerializeToString()
    data = b"\x12" + convert._varint(len(body)) + body
    back = convert.decode_sender_message(data)
    assert bytes(back.payload) == b"payload-first" and back.index == frame.index


def test_corruption_is_detected_by_the_checksum():
    data = bytearray(convert.encode_sender_message(_frame(b"\x00" * 4096)))
    data[-100] ^= 0x01
    assert not convert.decode_sender_message(bytes(data)).checksum_ok()


def test_garbage_is_rejected():
    with pytest.raises(Exception):
        convert.decode_sender_message(b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
    with pytest.raises(ValueError):
        convert.sender_from_proto(pb.KVStreamMessage())
    with pytest.raises(TypeError):
        convert.encode_receiver_message(HEADER)
