"""The receiver's per-request logic driven directly (no network), into a TensorSink."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from kvcluster.common.config import TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer.messages import (
    ChunkAck, ChunkFrame, ChunkNak, StreamCode, StreamHeader, frame_checksum,
)
from kvcluster.transfer.session import ReceiveSession
from kvcluster.transfer.tensor_sink import TensorSink

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2, dtype="float32")
TOKENS = tuple(range(100, 110))  # 10 tokens in chunks of 4: [0,4) [4,8) [8,10)
HEADER = StreamHeader("s", LAYOUT.identity, 3, 10, TOKENS, 4)


def toy_kv(token_ids, start: int) -> torch.Tensor:
    """A deterministic 'model': KV of token t at position p is t + p/100 everywhere."""
    end = len(token_ids)
    values = torch.tensor([token_ids[p] + p / 100 for p in range(start, end)])
    return values.view(1, 1, -1, 1, 1).expand(LAYOUT.shape(end - start)).contiguous()


def frames(index: int, level: str, payload: bytes, parts: int, attempt: int = 0):
    start, end = HEADER.token_range(index)
    step = -(-len(payload) // parts)
    for part in range(parts):
        piece = payload[part * step:(part + 1) * step]
        yield ChunkFrame("s", index, start, end, level, checksum=frame_checksum(piece),
                         attempt=attempt, part=part, num_parts=parts, chunk_bytes=len(payload),
                         payload=piece)


def run_session(script):
    """Run ``script(session)`` then wait for the session; returns (status, sink, replies)."""
    async def main():
        sink = TensorSink(LAYOUT, TOKENS, recompute_fn=toy_kv)
        levels = _raw_levels()
        with ThreadPoolExecutor(1) as pool:
            session = ReceiveSession(HEADER, sink, levels, LAYOUT,
                                     TransferConfig(max_resends=1), pool)
            replies = script(session)
            return await session.task, sink, replies
    return asyncio.run(main())


def _raw_levels():
    from tests.transfer.raw_codec import RawCodec
    from kvcluster.transfer.levels import LevelSet
    return LevelSet({"lossless": RawCodec()})


def raw(index: int) -> bytes:
    start, end = HEADER.token_range(index)
    return toy_kv(TOKENS[:end], start).numpy().tobytes()


def test_parts_assemble_text_recomputes_and_missing_chunks_are_recomputed():
    def script(session):
        replies = [session.on_frame(f) for f in frames(0, "lossless", raw(0), parts=3)]
        start, end = HEADER.token_range(1)
        text = ChunkFrame("s", 1, start, end, "text", token_ids=TOKENS[start:end],
                          checksum=frame_checksum(b"", TOKENS[start:end]))
        replies.append(session.on_frame(text))
        replies.append(session.on_frame(text))  # a duplicate is ignored
        session.close_input("stream ended")  # chunk 2 never came
        return replies

    status, sink, replies = run_session(script)
    assert replies[:2] == [None, None] and isinstance(replies[2], ChunkAck)
    assert isinstance(replies[3], ChunkAck) and replies[4] is None
    assert sink.written == {0: "decoded", 1: "recomputed", 2: "recomputed"}
    assert status.code == StreamCode.RECOMPUTED
    assert (status.num_chunks_decoded, status.num_chunks_recomputed) == (1, 2)
    assert status.payload_bytes == len(raw(0))
    assert torch.equal(sink.kv, toy_kv(TOKENS, 0))
    assert sink.closed_ok is True


def test_out_of_order_part_and_bad_checksum_are_naked_then_recomputed():
    def script(session):
        f0, f1 = frames(0, "lossless", raw(0), parts=2)
        replies = [session.on_frame(f1)]  # part 1 before part 0
        bad = next(frames(1, "lossless", raw(1), parts=1))
        bad = ChunkFrame(**{**bad.__dict__, "checksum": bad.checksum ^ 1})
        replies.append(session.on_frame(bad))
        again = ChunkFrame(**{**bad.__dict__, "attempt": 1})
        replies.append(session.on_frame(again))  # second failure > max_resends=1: give up
        replies += [session.on_frame(f) for f in frames(0, "lossless", raw(0), 2, attempt=1)]
        replies += [session.on_frame(f) for f in frames(2, "lossless", raw(2), parts=1)]
        return replies

    status, sink, replies = run_session(script)
    assert isinstance(replies[0], ChunkNak) and replies[0].resend
    assert "out of order" in replies[0].reason
    assert replies[1] == ChunkNak(1, 0, "checksum mismatch", True)
    assert replies[2] == ChunkNak(1, 1, "checksum mismatch", False)
    assert isinstance(replies[4], ChunkAck) and isinstance(replies[5], ChunkAck)
    assert sink.written == {0: "decoded", 1: "recomputed", 2: "decoded"}
    assert torch.equal(sink.kv, toy_kv(TOKENS, 0))


def test_parts_that_do_not_add_up_to_chunk_bytes_are_rejected():
    def script(session):
        f0, f1 = frames(0, "lossless", raw(0), parts=2)
        short = ChunkFrame(**{**f1.__dict__, "payload": bytes(f1.payload)[:-4],
                              "checksum": frame_checksum(bytes(f1.payload)[:-4])})
        replies = [session.on_frame(f0), session.on_frame(short)]
        session.close_input("done")
        return replies

    status, sink, replies = run_session(script)
    assert replies[0] is None and isinstance(replies[1], ChunkNak)
    assert "expected" in replies[1].reason and replies[1].resend
    assert sink.written[0] == "recomputed"
