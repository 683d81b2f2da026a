"""One request on the receiver: assemble, check, decode and store its chunks.

Two halves run concurrently so that chunk i is decoded while chunk i+1 is on
the wire:

* ``on_frame`` (called by the stream handler for every message, on the event
  loop) checks the frame's checksum, assembles a chunk's parts and answers with an
  ack, a nak (re-request) or nothing (more parts to come);
* ``_run`` (its own task) takes chunks in index order and decodes them in a
  thread pool (or recomputes them from tokens) into the :class:`KVSink`.

When input stops early (end marker, idle timeout, cancelled call, sender
gone), ``close_input`` marks every chunk that never arrived for recompute, so
the session always completes.

A chunk whose payload came over the data plane (``frame.data`` set) is taken
from the transfer's :class:`~kvcluster.transfer.data_plane.base.Window` once
its bytes have landed, checked like an inline one (length, checksum, in a
thread: XXH3 releases the GIL) and decoded straight from the window; once it
is stored, ``release`` tells the sender that range may be written again.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from kvcluster.common.config import TransferConfig
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.data_plane.base import DataPlaneError, Window
from kvcluster.transfer.messages import (
    ChunkAck, ChunkFrame, ChunkNak, ChunkReleased, ProtocolError, ReceiverMessage, StreamCode,
    StreamHeader, StreamStatus, frame_checksum,
)
from kvcluster.transfer.buffer_pool import BufferPool
from kvcluster.transfer.sink import DecodeSpeeds, KVSink


INLINE_VERIFY_BYTES = 1 << 20
"""Data-plane chunks up to this size are checksummed on the event loop; larger ones in
a thread (a hop costs a scheduling delay on a busy host, the hash ~0.1 ms per MiB)."""


@dataclass
class _Arrived:
    level: str
    payload: bytes | memoryview
    """Encoded KV; empty for text and for chunks to recompute."""
    recompute: bool = False
    pooled: bool = False
    """``payload`` is a BufferPool buffer, to be given back after storing."""
    data_attempt: int = -1
    """>= 0: ``payload`` lies in the data plane's window (this attempt's range), to be
    released to the sender after storing."""


@dataclass
class _Assembly:
    buffer: memoryview
    """From the receiver's BufferPool; given back once the chunk is stored."""
    offset: int = 0
    next_part: int = 0


@dataclass
class SessionStats:
    levels: dict[int, str] = field(default_factory=dict)
    """chunk index -> level decoded, "text", or "recomputed" (never arrived / bad)."""
    payload_bytes: int = 0
    decode_intervals: list[tuple[float, float]] = field(default_factory=list)
    last_arrival: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    finished: float = 0.0


class ReceiveSession:
    def __init__(self, header: StreamHeader, sink: KVSink, levels: LevelSet, layout,
                 config: TransferConfig, executor: Executor,
                 decode_speeds: DecodeSpeeds | None = None,
                 buffers: BufferPool | None = None, window: Window | None = None,
                 release: Callable[[ChunkReleased], Awaitable[None]] | None = None,
                 verify_executor: Executor | None = None):
        """
        Args:
            window: the data plane window lent to this transfer (None: inline only).
            release: sends a ChunkReleased to the sender (data-plane chunks, once stored).
            verify_executor: where data-plane checksums run (default: ``executor``).
        """
        expected = -(-header.num_tokens // max(header.chunk_tokens, 1))
        if header.chunk_tokens <= 0 or header.num_chunks != expected:
            raise ProtocolError(f"header: {header.num_chunks} chunks of {header.chunk_tokens} "
                             f"tokens cannot cover {header.num_tokens} tokens")
        if len(header.token_ids) != header.num_tokens:
            raise ProtocolError("header: token_ids do not match num_tokens")
        self.header, self.sink, self.levels, self.layout = header, sink, levels, layout
        self.config, self.executor = config, executor
        self.decode_speeds = decode_speeds or DecodeSpeeds()
        self.buffers = buffers or BufferPool()
        self.window, self._release = window, release
        self.verify_executor = verify_executor or executor
        self.stats = SessionStats()
        self.input_closed_reason = ""
        self._input_closed = False
        self._parts: dict[int, _Assembly] = {}
        self._attempt: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._ready: dict[int, _Arrived] = {}
        self._changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._next_index = 0
        self.task = asyncio.get_running_loop().create_task(self._run())
        self.task.add_done_callback(lambda _: self._drained.set())

    # ------------------------------------------------------------ input side

    async def receive(self, frame: ChunkFrame) -> ReceiverMessage | None:
        """Take one message, inline or data plane; returns the reply to send, if any."""
        if frame.data is None:
            return self.on_frame(frame)
        return await self.on_data_frame(frame)

    async def on_data_frame(self, frame: ChunkFrame) -> ReceiverMessage | None:
        """A chunk whose bytes went over the data plane: wait for them, check, ack.

        Raises:
            asyncio.TimeoutError: the bytes did not land within ``chunk_timeout_s``
                (the caller treats it as a silent sender).
        """
        index = frame.index
        self.stats.last_arrival = time.perf_counter()
        if (not 0 <= index < self.header.num_chunks or index in self._ready
                or frame.attempt < self._attempt.get(index, 0)):
            return ChunkReleased(index, frame.attempt)  # stray: never read, free its range
        if self.window is None:
            return self._reject(frame, "no data plane window was granted to this transfer")
        if not self._frame_fits(frame) or frame.num_parts != 1:
            return self._reject(frame, "chunk header does not fit the stream")
        if frame.data.length != frame.chunk_bytes:
            return self._reject(frame, f"data plane range holds {frame.data.length} bytes, "
                                       f"the chunk header says {frame.chunk_bytes}")
        try:
            payload = await self.window.landed(frame.data, self.config.chunk_timeout_s)
        except DataPlaneError as exc:
            return self._reject(frame, f"data plane: {exc}")
        self.stats.last_arrival = time.perf_counter()
        if len(payload) <= INLINE_VERIFY_BYTES:  # ~0.1 ms: cheaper than a thread hop
            checksum = frame_checksum(payload)
        else:
            checksum = await asyncio.get_running_loop().run_in_executor(
                self.verify_executor, frame_checksum, payload)
        if checksum != frame.checksum:
            return self._reject(frame, "checksum mismatch")
        self.stats.payload_bytes += len(payload)
        self._put(index, _Arrived(frame.level, payload, data_attempt=frame.attempt))
        return ChunkAck(index, frame.attempt, len(payload))

    def on_frame(self, frame: ChunkFrame) -> ReceiverMessage | None:
        """Take one inline message; returns the reply to send, if any."""
        index = frame.index
        self.stats.last_arrival = time.perf_counter()
        if not 0 <= index < self.header.num_chunks or index in self._ready:
            return None  # duplicate or stray
        if frame.attempt < self._attempt.get(index, 0):
            return None  # rest of an attempt already rejected
        if not frame.checksum_ok() or not self._frame_fits(frame):
            return self._reject(frame, "checksum mismatch")
        if frame.num_parts == 1:
            payload = frame.payload  # zero-copy view of the received message
        else:
            payload, problem = self._assemble(frame)
            if problem:
                return self._reject(frame, problem)
            if payload is None:
                return None  # more parts to come
        if len(payload) != frame.chunk_bytes:
            return self._reject(frame, f"chunk has {len(payload)} bytes, expected {frame.chunk_bytes}")
        self.stats.payload_bytes += len(payload)
        self._put(index, _Arrived(frame.level, payload, pooled=frame.num_parts > 1))
        return ChunkAck(index, frame.attempt, len(payload))

    def _assemble(self, frame: ChunkFrame) -> tuple[memoryview | None, str]:
        """Copy a part into the chunk's buffer while it is still in cache.

        Returns:
            (the whole chunk once its last part is in, else None; a problem or "").
            Parts of one attempt arrive in order (one HTTP/2 stream).
        """
        index = frame.index
        if frame.part == 0:
            self._drop_parts(index)
            self._parts[index] = _Assembly(self.buffers.take(frame.chunk_bytes))
        assembly = self._parts.get(index)
        if assembly is None or frame.part != assembly.next_part:
            return None, f"part {frame.part} out of order"
        if assembly.offset + len(frame.payload) > len(assembly.buffer):
            return None, "parts exceed chunk_bytes"
        end = assembly.offset + len(frame.payload)
        assembly.buffer[assembly.offset:end] = frame.payload
        assembly.offset, assembly.next_part = end, assembly.next_part + 1
        if assembly.next_part < frame.num_parts:
            return None, ""
        if assembly.offset != len(assembly.buffer):
            return None, f"parts hold {assembly.offset} bytes, expected {len(assembly.buffer)}"
        del self._parts[index]
        return assembly.buffer, ""

    def close_input(self, reason: str) -> None:
        """No more frames will come: whatever is missing is recomputed. Idempotent."""
        if self._input_closed:
            return
        self._input_closed = True
        self.input_closed_reason = reason
        for index in range(self.header.num_chunks):
            if index not in self._ready:
                self._put(index, _Arrived("recomputed", b"", recompute=True))

    @property
    def backlog(self) -> int:
        """Chunks received and waiting to be decoded."""
        return sum(1 for i in self._ready if i >= self._next_index)

    async def wait_drained(self) -> None:
        """Backpressure: wait while enough received chunks wait for the decoder.

        Never waits when the decoder's next chunk is missing (it must be read,
        or re-sent, first: waiting then would deadlock).
        """
        while (self.backlog >= self.config.max_pending_chunks
               and self._next_index in self._ready and not self.task.done()):
            self._drained.clear()
            await self._drained.wait()

    # ------------------------------------------------------------ decode side

    async def _run(self) -> StreamStatus:
        failed = ""
        loop = asyncio.get_running_loop()
        for index in range(self.header.num_chunks):
            item = await self._take(index)
            try:
                await loop.run_in_executor(self.executor, self._store, index, item)
            except Exception as exc:  # a chunk we cannot store fails the request
                failed = f"chunk {index}: {type(exc).__name__}: {exc}"
                break
            finally:
                if item.pooled:
                    self.buffers.give(item.payload)
            if item.data_attempt >= 0 and self._release is not None:
                await self._release(ChunkReleased(index, item.data_attempt))
        self.stats.finished = time.perf_counter()
        self.sink.close(ok=not failed)
        return self._status(failed)

    async def _take(self, index: int) -> _Arrived:
        while index not in self._ready:
            self._changed.clear()
            await self._changed.wait()
        self._next_index = index + 1
        self._drained.set()
        return self._ready[index]

    def _store(self, index: int, item: _Arrived) -> None:
        """Runs in the thread pool: decode (or recompute) one chunk into the sink."""
        token_range = self.header.token_range(index)
        began = time.perf_counter()
        if not item.recompute and item.level != "text":
            try:
                kv = self.levels.codec(item.level).decode(item.payload, self.layout)
                self.sink.write_chunk(index, token_range, kv)
                self.stats.levels[index] = item.level
                finished = time.perf_counter()
                self.stats.decode_intervals.append((began, finished))
                self.decode_speeds.observe(item.level, token_range[1] - token_range[0],
                                           finished - began)
                return
            except ValueError as exc:  # CodecError, unknown level, wrong shape
                item = _Arrived(f"recomputed ({type(exc).__name__})", b"", recompute=True)
        start, end = token_range
        self.sink.recompute_chunk(index, token_range, self.header.token_ids[start:end])
        self.stats.levels[index] = "text" if item.level == "text" else "recomputed"

    # ------------------------------------------------------------ helpers

    def _frame_fits(self, frame: ChunkFrame) -> bool:
        start, end = self.header.token_range(frame.index)
        ok = (frame.token_start, frame.token_end) == (start, end) and 0 <= frame.part < frame.num_parts
        if frame.is_text:
            return ok and frame.token_ids == self.header.token_ids[start:end]
        return ok and frame.level in self.levels

    def _drop_parts(self, index: int) -> None:
        assembly = self._parts.pop(index, None)
        if assembly is not None:
            self.buffers.give(assembly.buffer)

    def _reject(self, frame: ChunkFrame, reason: str) -> ChunkNak:
        index = frame.index
        self._drop_parts(index)
        self._attempt[index] = frame.attempt + 1
        self._failures[index] = self._failures.get(index, 0) + 1
        resend = self._failures[index] <= self.config.max_resends
        if not resend:
            self._put(index, _Arrived("recomputed", b"", recompute=True))
        return ChunkNak(index, frame.attempt, reason, resend)

    def _put(self, index: int, item: _Arrived) -> None:
        self._ready[index] = item
        self._changed.set()

    def _status(self, failed: str) -> StreamStatus:
        stats = self.stats
        recomputed = sum(1 for lv in stats.levels.values() if lv in ("text", "recomputed"))
        decode_total = sum(b - a for a, b in stats.decode_intervals)
        overlap = sum(max(0.0, min(b, stats.last_arrival) - a) for a, b in stats.decode_intervals)
        if failed:
            code = StreamCode.FAILED
        else:
            code = StreamCode.RECOMPUTED if recomputed else StreamCode.OK
        message = failed or self.input_closed_reason
        return StreamStatus(code, message, len(stats.levels) - recomputed, recomputed,
                            stats.payload_bytes, stats.finished - stats.started,
                            overlap, decode_total)
