"""The receiving end of KV streams: one :class:`ReceiveSession` per request.

Transport-agnostic: :meth:`KVReceiver.run_stream` takes ``read`` (next
message, None at the end of the stream) and ``write`` coroutines; the gRPC
binding is in :mod:`kvcluster.transfer.server`, which also attaches the data
planes (:mod:`kvcluster.transfer.data_plane`): a header's offer is answered
with a grant (and a window lent for the transfer) before any chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable

from kvcluster.common.config import TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer.buffer_pool import BufferPool
from kvcluster.transfer.data_plane.factory import ReceiverDataPlanes
from kvcluster.transfer.data_plane.grpc_inline import inline_grant
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.messages import (
    ChunkFrame, ProtocolError, ReceiverInfo, ReceiverMessage, SenderMessage, StreamCode, StreamEnd,
    StreamHeader, StreamStatus,
)
from kvcluster.transfer.session import ReceiveSession, SessionStats
from kvcluster.transfer.sink import DecodeSpeeds, KVSink, RecomputeSpeed, SinkFactory

log = logging.getLogger(__name__)

ReadFn = Callable[[], Awaitable[SenderMessage | None]]
WriteFn = Callable[[ReceiverMessage], Awaitable[None]]


@dataclass
class ReceiveResult:
    status: StreamStatus
    stats: SessionStats
    sink: KVSink


class KVReceiver:
    def __init__(self, layout: KVLayout, levels: LevelSet, sink_factory: SinkFactory,
                 config: TransferConfig | None = None, speed: RecomputeSpeed | None = None):
        """
        Args:
            sink_factory: opens the sink of each new request.
            speed: the recompute speed the sinks measure, advertised to senders.
        """
        self.layout = layout
        self.levels = levels
        self.sink_factory = sink_factory
        self.config = config or TransferConfig()
        self.speed = speed or RecomputeSpeed()
        self.decode_speeds = DecodeSpeeds()
        self.buffers = BufferPool()
        self.executor = ThreadPoolExecutor(self.config.decode_threads, "kv-decode")
        self.verify_executor = ThreadPoolExecutor(2, "kv-verify")
        self.data_planes: ReceiverDataPlanes | None = None
        """Set by the server that binds them; None: every payload inline."""
        self._results: dict[str, asyncio.Future] = {}
        self._forgotten: set[str] = set()

    def info(self) -> ReceiverInfo:
        return ReceiverInfo((self.layout.identity,), tuple(self.levels.names),
                            self.speed.tokens_per_s, self.config.max_message_bytes,
                            self.decode_speeds.as_tuple())

    async def run_stream(self, read: ReadFn, write: WriteFn) -> StreamStatus:
        """Serve one stream to completion; survives the sender vanishing."""
        header = await self._read(read)
        if not isinstance(header, StreamHeader):
            raise ProtocolError("a stream must start with a header")
        self._check(header)
        grant, window = (self.data_planes.open(header, self.layout) if self.data_planes
                         else (inline_grant("no data plane here"), None))
        replies = _Replies(write)
        try:
            session = self._open(header, window, replies.release)
        except BaseException:
            if window is not None:
                window.close(clean=True)  # no grant went out: nothing was written there
            raise
        try:
            if header.data_plane is not None:
                await replies(grant)
            await self._pump(session, read, replies)
        except asyncio.TimeoutError:
            session.close_input(f"sender silent for {self.config.chunk_timeout_s:g} s")
        finally:  # also on cancellation: the session task finishes on its own
            session.close_input("stream ended before all chunks arrived")
            if window is not None:  # once the decoder is done with its bytes
                clean = session.input_closed_reason == ""  # the sender sent its end marker
                session.task.add_done_callback(lambda _: window.close(clean))
        status = dataclasses.replace(await asyncio.shield(session.task),
                                     decode_tokens_per_s=self.decode_speeds.as_tuple(),
                                     prefill_tokens_per_s=self.speed.tokens_per_s)
        await replies(status)
        return status

    async def wait_result(self, request_id: str, timeout_s: float | None = None) -> ReceiveResult:
        """Claim the outcome of ``request_id`` once its session has finished.

        A result is claimed once; one given up on (timeout, cancellation) is
        discarded, and so is one nobody claims within ``unclaimed_result_s``.
        """
        self._forgotten.discard(request_id)  # a claimant again
        future = self._future(request_id)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.forget(request_id)
            raise
        if self._results.get(request_id) is future:
            del self._results[request_id]
        return result

    def forget(self, request_id: str) -> None:
        """Nobody will claim ``request_id``: free its KV now, or once its stream ends.

        Streams of it that end within ``unclaimed_result_s`` are discarded at once.
        """
        future = self._results.pop(request_id, None)
        if future is not None and future.done():
            self._discard_sink(future.result().sink)
            return
        self._forgotten.add(request_id)
        asyncio.get_running_loop().call_later(self.config.unclaimed_result_s,
                                              self._forgotten.discard, request_id)

    @property
    def num_unclaimed(self) -> int:
        """Results (finished or in flight) nobody has claimed yet."""
        return len(self._results)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.verify_executor.shutdown(wait=False, cancel_futures=True)

    def data_plane_stats(self) -> dict:
        """What ``kvcluster status`` shows: the setting, planes served, grants by plane."""
        if self.data_planes is None:
            return {"data_plane": "grpc", "grants": {}}
        return self.data_planes.stats()

    # ------------------------------------------------------------ helpers

    def _check(self, header: StreamHeader) -> None:
        if header.layout_identity != self.layout.identity:
            raise ProtocolError(f"layout {header.layout_identity} is not {self.layout.identity}")

    def _open(self, header: StreamHeader, window=None, release=None) -> ReceiveSession:
        stale = self._results.get(header.request_id)
        if stale is not None and stale.done():  # a resent request: the newest stream wins
            self.forget(header.request_id)
        sink = self.sink_factory(header)
        session = ReceiveSession(header, sink, self.levels, self.layout, self.config,
                                 self.executor, self.decode_speeds, self.buffers, window,
                                 release, self.verify_executor)
        future = self._future(header.request_id)
        session.task.add_done_callback(
            lambda task: self._publish(task, future, session, sink))
        return session

    def _publish(self, task: asyncio.Task, future: asyncio.Future, session: ReceiveSession,
                 sink: KVSink) -> None:
        request_id = session.header.request_id
        if future.done() or request_id in self._forgotten:
            self._discard_sink(sink)  # given up on, or another stream published first
            if self._results.get(request_id) is future and not future.done():
                del self._results[request_id]
            return
        future.set_result(ReceiveResult(_final_status(task, request_id), session.stats, sink))
        asyncio.get_running_loop().call_later(self.config.unclaimed_result_s,
                                              self._expire, request_id, future)

    def _expire(self, request_id: str, future: asyncio.Future) -> None:
        if self._results.get(request_id) is future:
            log.warning("request %s: KV received but never claimed; discarded", request_id)
            self.forget(request_id)

    def _discard_sink(self, sink: KVSink) -> None:
        """Off the event loop: a sink may wait for the engine's lock."""
        self.executor.submit(sink.discard)

    async def _pump(self, session: ReceiveSession, read: ReadFn, write: WriteFn) -> None:
        while True:
            await session.wait_drained()  # backpressure: stop reading while decode lags
            message = await self._read(read)
            if message is None or isinstance(message, StreamEnd):
                session.close_input("" if message else "stream closed without an end marker")
                return
            if not isinstance(message, ChunkFrame):
                raise ProtocolError(f"unexpected {type(message).__name__} inside a stream")
            reply = await session.receive(message)
            if reply is not None:
                await write(reply)

    async def _read(self, read: ReadFn) -> SenderMessage | None:
        return await asyncio.wait_for(read(), self.config.chunk_timeout_s)

    def _future(self, request_id: str) -> asyncio.Future:
        if request_id not in self._results:
            self._results[request_id] = asyncio.get_running_loop().create_future()
        return self._results[request_id]


class _Replies:
    """The stream's write side, shared by the reader (acks) and the decoder (releases):
    one write at a time."""

    def __init__(self, write: WriteFn):
        self._write = write
        self._lock = asyncio.Lock()

    async def __call__(self, message: ReceiverMessage) -> None:
        async with self._lock:
            await self._write(message)

    async def release(self, message: ReceiverMessage) -> None:
        """Best effort: a sender that is gone needs no release."""
        try:
            await self(message)
        except Exception as exc:  # noqa: BLE001 - the call ended: nothing to tell
            log.debug("release not sent: %s", exc)


def _final_status(task: asyncio.Task, request_id: str) -> StreamStatus:
    if task.cancelled():
        status = StreamStatus(StreamCode.FAILED, "session cancelled")
    elif task.exception() is not None:
        status = StreamStatus(StreamCode.FAILED, repr(task.exception()))
    else:
        status = task.result()
    if status.code == StreamCode.FAILED:
        log.warning("request %s failed: %s", request_id, status.message)
    return status
