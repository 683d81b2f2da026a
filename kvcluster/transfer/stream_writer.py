"""One request on the sender: header, chunks at the policy's levels, re-sends, end.

Flow control: at most ``config.max_inflight_chunks`` chunks are sent and not
yet acked (the receiver acks a chunk when it has all of it and the checksum
is good, before decoding it; it stops reading while its decode backlog is
full, which stalls HTTP/2 and then this window).

Bandwidth samples come from acks: chunk i occupied the wire from
``max(its first write, the previous ack)`` until its ack. Not when the
receiver's decoder was behind: the receiver then stops reading
(``max_pending_chunks``) and the ack times its decoder, not the wire; a slow
decoder would pass for a slow link and push the policy to smaller levels that
decode no faster. The sender predicts the decoder from the arrivals and the
decode speeds the receiver reports, and skips a chunk's sample when the chunk
before it was predicted still waiting for the decoder as this one was written.

Data plane: the header offers the sender's planes and the receiver's first
reply grants one (or inline). A chunk then goes as a write of its bytes into
the granted window (at a range this writer allocates and frees on the
receiver's ChunkReleased, or on a nak of that attempt), followed by its
metadata with a DataRef on the stream. Inline instead: text chunks, chunks
larger than the window, a re-send that finds the window full (the chunks
holding it wait for the one being re-sent: waiting could deadlock), and every
chunk after a data-plane write failed. The chunk's wire time, and so the
bandwidth sample, starts before its data-plane write: the policy measures
whatever carries the bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from kvcluster.common.config import TransferConfig
from kvcluster.transfer.bandwidth import BandwidthEstimator
from kvcluster.transfer.data_plane.base import DataLink, DataPlaneError, WriteRange
from kvcluster.transfer.data_plane.factory import SenderDataPlanes
from kvcluster.transfer.data_plane.ranges import RangeAllocator
from kvcluster.transfer.messages import (
    INLINE_PLANE, TEXT_LEVEL, ChunkAck, ChunkFrame, ChunkNak, ChunkReleased, DataPlaneGrant,
    DataRef, ReceiverInfo, StreamEnd, StreamHeader, StreamStatus, frame_checksum,
)
from kvcluster.transfer.policy import ChunkPlan, LevelPolicy
from kvcluster.transfer.shaper import NullShaper, Shaper
from kvcluster.transfer.source import ChunkSource

log = logging.getLogger(__name__)

BeforeChunk = Callable[[int], None]
"""Called with a chunk's index before its level is chosen (benchmarks set the link rate)."""
PayloadFilter = Callable[[int, int, memoryview], bytes | memoryview]
"""(index, attempt, part payload) -> what goes on the wire; for fault injection only."""


@dataclass
class ChunkRecord:
    """What the sender planned and saw for one chunk (diagnostics; times from send())."""

    level: str
    num_bytes: int
    budget_s: float
    """The policy's per-chunk budget: time left / chunks left."""
    planned_bytes_per_s: float | None
    """The bandwidth the policy planned with (None: the probe)."""
    sent_at_s: float
    acked_at_s: float = 0.0
    """0 until acked (a stall shows as the first chunk that never was)."""


@dataclass
class SendResult:
    request_id: str
    status: StreamStatus | None
    """The receiver's final status; None when the stream failed."""
    levels: list[str] = field(default_factory=list)
    """Level of each chunk's last send."""
    elapsed_s: float = 0.0
    """From send() until the final status: the KV is in the receiver's sink."""
    bytes_sent: int = 0
    resends: int = 0
    error: str = ""
    chunks: list[ChunkRecord] = field(default_factory=list)
    """Per chunk index, in order of first send."""
    data_plane: str = INLINE_PLANE
    """The plane the receiver granted and this sender could use ("grpc": inline)."""
    data_plane_bytes: int = 0
    """Payload bytes that went over the data plane (the rest of bytes_sent inline)."""

    @property
    def ok(self) -> bool:
        """The receiver reported the stream complete."""
        return self.status is not None and self.status.ok

    @property
    def message(self) -> str:
        """Why it failed (this sender's error, else the receiver's word); "" when ok."""
        return self.error or (self.status.message if self.status else "")

    @property
    def tail_s(self) -> float:
        """From the last ack to the final status: the receiver's last decode(s)."""
        acked = [c.acked_at_s for c in self.chunks if c.acked_at_s]
        return self.elapsed_s - max(acked) if acked and self.status is not None else 0.0


@dataclass
class StreamOptions:
    slo_ms: float
    before_chunk: BeforeChunk | None = None
    payload_filter: PayloadFilter | None = None


class StreamWriter:
    def __init__(self, call, request_id: str, source: ChunkSource, policy: LevelPolicy,
                 estimator: BandwidthEstimator, info: ReceiverInfo, config: TransferConfig,
                 options: StreamOptions, shaper: Shaper | None = None,
                 data_planes: SenderDataPlanes | None = None, target_host: str = ""):
        """
        Args:
            data_planes: the sender's planes (None: inline only); ``target_host`` is
                where the gRPC stream goes (a tcp grant may name only a port).
        """
        self.call, self.request_id, self.source = call, request_id, source
        self.policy, self.estimator, self.info = policy, estimator, info
        self._decode_speeds = dict(info.decode_tokens_per_s)
        """level -> the receiver's decode tokens/s, as it reported them."""
        self.config, self.options = config, options
        self.shaper = shaper or NullShaper()
        self.result = SendResult(request_id, None, [""] * source.num_chunks)
        self._window = asyncio.Semaphore(config.max_inflight_chunks)
        self._unresolved = set(range(source.num_chunks))
        self._resend: list[int] = []
        self._changed = asyncio.Event()
        self._first_write: dict[int, float] = {}
        self._last_ack = 0.0
        self._decode_starts: dict[int, float] = {}
        """Predicted start of each acked chunk's decode on the receiver."""
        self._decoder_free = 0.0
        self._attempt_count: dict[int, int] = {}
        self._data_planes, self._target_host = data_planes, target_host
        self._offer = data_planes.offer() if data_planes is not None else None
        self._grant: asyncio.Future | None = None
        """The receiver's DataPlaneGrant, once it arrives (made in run())."""
        self._link: DataLink | None = None
        self._ranges: RangeAllocator | None = None
        self._placed: dict[tuple[int, int], int] = {}
        """(index, attempt) -> offset of its bytes in the window, until released."""
        self._write_ids = itertools.count(1)
        self._started = time.perf_counter()

    async def run(self) -> SendResult:
        self._grant = asyncio.get_running_loop().create_future()
        self._reader = reader = asyncio.ensure_future(self._read_replies())
        try:
            await self._write(self._header())
            await self._open_data_plane()
            for index in range(self.source.num_chunks):
                await self._wait_window()
                await self._send_resends()
                await self._measure_sizes(index)
                await self._send_chunk(index, self._choose(index), attempt=0)
            while self._unresolved and not reader.done():
                self._changed.clear()
                await self._send_resends()
                await self._changed.wait()
            await self._write(StreamEnd(self.source.num_chunks))
            await self.call.done_writing()
            self.result.status = await reader
        finally:
            reader.cancel()
            if self._link is not None:
                self._link.close()
            self.result.elapsed_s = time.perf_counter() - self._started
        return self.result

    # ------------------------------------------------------------ data plane

    async def _open_data_plane(self) -> None:
        """Wait for the receiver's grant (its first reply) and open the link."""
        if self._offer is None:
            return
        grant: DataPlaneGrant = await self._unless_stream_ends(self._grant)
        self._link = self._data_planes.link(grant, self._target_host)
        if self._link is not None:
            self._ranges = RangeAllocator(self._link.window_bytes)
            self.result.data_plane = grant.plane
        elif not grant.inline:
            self.result.data_plane = f"{INLINE_PLANE} ({grant.plane} unusable)"

    def _wants_data_plane(self, level: str, attempt: int, size: int) -> bool:
        if self._link is None or level == TEXT_LEVEL or not 0 < size <= self._ranges.size:
            return False
        return attempt == 0 or self._ranges.can_allocate(size)

    async def _send_over_data_plane(self, index: int, level: str, attempt: int,
                                    payload: memoryview) -> bool:
        """Write the chunk into the window, then its metadata; False: send it inline."""
        size = len(payload)
        offset = await self._unless_stream_ends(self._ranges.wait_allocate(size))
        self._placed[(index, attempt)] = offset
        data = payload
        if self.options.payload_filter is not None:  # fault injection, after the checksum
            data = memoryview(self.options.payload_filter(index, attempt, payload))
        await self.shaper.acquire(size)
        write_id = next(self._write_ids)
        try:
            await self._unless_stream_ends(self._link.write([WriteRange(data, offset)],
                                                            write_id))
        except DataPlaneError as exc:
            log.warning("request %s: data plane %s failed, the rest goes inline: %s",
                        self.request_id, self.result.data_plane, exc)
            self._release(index, attempt)
            self._link = None
            self.result.data_plane += " (broke: inline)"
            return False
        spec = self.source.specs[index]
        await self._write(ChunkFrame(
            self.request_id, index, spec.token_start, spec.token_end, level,
            checksum=self.source.checksum(index, level), attempt=attempt, chunk_bytes=size,
            data=DataRef(offset, size, write_id)))
        self.result.bytes_sent += size
        self.result.data_plane_bytes += size
        return True

    def _release(self, index: int, attempt: int) -> None:
        offset = self._placed.pop((index, attempt), None)
        if offset is not None and self._ranges is not None:
            self._ranges.free(offset)

    # ------------------------------------------------------------ sending

    async def _measure_sizes(self, index: int) -> None:
        """Encode this chunk at the levels whose size nobody has measured yet (a new
        process), in a thread: the policy then plans with real sizes, not raw ones."""
        if self.source.unmeasured_levels(index):
            await asyncio.get_running_loop().run_in_executor(
                None, self.source.measure_sizes, index)

    def _choose(self, index: int) -> str:
        if self.options.before_chunk is not None:
            self.options.before_chunk(index)
        spec = self.source.specs[index]
        elapsed_s = time.perf_counter() - self._started
        deadline_s = self.options.slo_ms / 1000 * (1 - self.config.slo_reserve)
        plan = ChunkPlan(index, self.source.num_chunks, spec.num_tokens, deadline_s - elapsed_s,
                         self.source.bytes_by_level(index),
                         self.estimator.planning_bytes_per_s(self.config.bandwidth_quantile),
                         self.info.prefill_tokens_per_s, self._decode_speeds,
                         self.source.num_tokens - spec.token_end,
                         self.estimator.seconds_per_byte_samples())
        level = self.policy.choose(plan)
        self.result.chunks.append(ChunkRecord(
            level, plan.bytes_by_level.get(level, 0), plan.time_left_s / plan.chunks_left,
            plan.bytes_per_s, time.perf_counter() - self._started))
        return level

    async def _send_chunk(self, index: int, level: str, attempt: int) -> None:
        payload = await self._payload(index, level)
        self.result.levels[index] = level
        self._first_write[index] = time.perf_counter()
        if self._wants_data_plane(level, attempt, len(payload)) and \
                await self._send_over_data_plane(index, level, attempt, payload):
            return
        for frame in self._frames(index, level, attempt, payload):
            await self.shaper.acquire(len(frame.payload))
            await self._write(frame)
            self.result.bytes_sent += len(frame.payload)

    async def _payload(self, index: int, level: str) -> memoryview:
        if level == TEXT_LEVEL or self.source.has_payload(index, level):
            return memoryview(self.source.payload(index, level))
        data = await asyncio.get_running_loop().run_in_executor(
            None, self.source.payload, index, level)
        return memoryview(data)

    def _frames(self, index: int, level: str, attempt: int, payload: memoryview):
        spec = self.source.specs[index]
        token_ids = self.source.chunk_token_ids(index) if level == TEXT_LEVEL else ()
        step = self.config.message_payload_bytes
        num_parts = max(1, -(-len(payload) // step))
        for part in range(num_parts):
            piece = payload[part * step:(part + 1) * step]
            checksum = frame_checksum(piece, token_ids)
            if self.options.payload_filter is not None:
                piece = self.options.payload_filter(index, attempt, piece)
            yield ChunkFrame(self.request_id, index, spec.token_start, spec.token_end, level,
                             token_ids, checksum, attempt, part, num_parts, len(payload), piece)

    async def _send_resends(self) -> None:
        while self._resend:
            index = self._resend.pop(0)
            self.result.resends += 1
            await self._send_chunk(index, self.result.levels[index], self._attempts(index))

    async def _wait_window(self) -> None:
        await self._unless_stream_ends(self._window.acquire())

    async def _write(self, message) -> None:
        await self._unless_stream_ends(self.call.write(message))

    async def _unless_stream_ends(self, operation):
        """Await ``operation``, but give up as soon as the reply stream ends: a write
        on a call the receiver has terminated (e.g. a message over its maximum
        size) may otherwise never complete."""
        task = asyncio.ensure_future(operation)
        await asyncio.wait({task, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and (task.exception() is None or not self._reader.done()):
            return task.result()
        task.cancel()
        self._reader.result()  # raises the stream's error
        raise ConnectionError("receiver closed the stream before all chunks were sent")

    # ------------------------------------------------------------ replies

    async def _read_replies(self) -> StreamStatus:
        try:
            async for reply in self.call:
                if isinstance(reply, StreamStatus):
                    return reply
                if isinstance(reply, ChunkAck):
                    self._on_ack(reply)
                elif isinstance(reply, ChunkNak):
                    self._on_nak(reply)
                elif isinstance(reply, ChunkReleased):
                    self._release(reply.index, reply.attempt)
                elif isinstance(reply, DataPlaneGrant) and not self._grant.done():  # first reply
                    self._grant.set_result(reply)
                self._changed.set()
            raise ConnectionError("stream ended without a final status")
        finally:
            self._changed.set()  # wake run() whether the stream ended well or not

    def _on_ack(self, ack: ChunkAck) -> None:
        now = time.perf_counter()
        level = self.result.levels[ack.index]
        if level != TEXT_LEVEL and not self._decoder_was_behind(ack.index):
            began = max(self._first_write.get(ack.index, now), self._last_ack)
            self.estimator.observe(ack.payload_bytes, now - began)
        self._predict_decode(ack.index, level, now)
        self._last_ack = now
        if ack.index < len(self.result.chunks):
            self.result.chunks[ack.index].acked_at_s = now - self._started
        self._resolve(ack.index)

    def _decoder_was_behind(self, index: int) -> bool:
        start = self._decode_starts.get(index - 1)
        return start is not None and start > self._first_write.get(index, start)

    def _predict_decode(self, index: int, level: str, arrived: float) -> None:
        """The receiver decodes chunks one after another, each once it has arrived."""
        if level == TEXT_LEVEL:
            speed = self.info.prefill_tokens_per_s
        else:
            speed = self._decode_speeds.get(level, 0.0)
        start = max(arrived, self._decoder_free)
        self._decode_starts[index] = start
        num_tokens = self.source.specs[index].num_tokens
        self._decoder_free = start + (num_tokens / speed if speed > 0 else 0.0)

    def _on_nak(self, nak: ChunkNak) -> None:
        self._release(nak.index, nak.attempt)  # a rejected attempt is never read again
        if nak.resend:
            self._resend.append(nak.index)
        else:
            self._resolve(nak.index)

    def _resolve(self, index: int) -> None:
        if index in self._unresolved:
            self._unresolved.discard(index)
            self._window.release()

    def _attempts(self, index: int) -> int:
        self._attempt_count[index] = self._attempt_count.get(index, 0) + 1
        return self._attempt_count[index]

    def _header(self) -> StreamHeader:
        src = self.source
        return StreamHeader(self.request_id, src.layout.identity, src.num_chunks, src.num_tokens,
                            src.token_ids, src.chunk_tokens, self.options.slo_ms, self._offer)
