"""PDReceiver: a vLLM decode instance's KV receiver, inside vLLM's worker process.

    prefill instance --kvcluster transfer--> TransferServer (own thread, own loop)
        -> KVReceiver -> BlockSink per stream -> PagedKV.scatter into the request's blocks

    vLLM's worker thread, every step (the connector's worker half):
        expect(RecvSpec)       the scheduler allocated the request's blocks and holds it
                               in WAITING_FOR_REMOTE_KVS; a stream that came first was
                               kept and is written now
        poll(finished ids)     -> (finished_recving, blocks that hold no streamed KV)

A request is done receiving when its stream closed, or its sender is gone
(:meth:`abandon`), or nothing complete came within its timeout, or vLLM finished it
(aborted); its sink is released first, so nothing writes to its blocks after vLLM
gets them back. Blocks the stream did not fill are reported as load errors: with
``kv_load_failure_policy: recompute`` vLLM computes them, never a wrong token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from kvcluster.common.config import ClusterConfig
from kvcluster.common.layout import KVLayout
from kvcluster.integrations.vllm.metadata import RecvSpec
from kvcluster.integrations.vllm.paged_kv import PagedKV
from kvcluster.integrations.vllm.pd_sink import BlockSink, BlockTarget
from kvcluster.transfer.messages import StreamHeader
from kvcluster.transfer.receiver import KVReceiver
from kvcluster.transfer.security import ServerSecurity
from kvcluster.transfer.server import TransferServer
from kvcluster.transfer.sink import RecomputeSpeed

log = logging.getLogger(__name__)


@dataclass
class _Expected:
    spec: RecvSpec
    deadline_s: float


@dataclass
class PDReceiverStats:
    streams_opened: int = 0
    requests_filled: int = 0
    """Requests whose every expected block came from the stream."""
    requests_short: int = 0
    """Requests vLLM computes (partly): why in ``last_failures``."""
    tokens_written: int = 0
    last_failures: list[str] = field(default_factory=list)


class PDReceiver:
    def __init__(self, config: ClusterConfig, layout: KVLayout, paged: PagedKV):
        self.config = config
        self.layout = layout
        self.paged = paged
        self.stats = PDReceiverStats()
        self.address = ""
        self._expected: dict[str, _Expected] = {}
        """transfer id -> what the scheduler allocated for it."""
        self._sinks: dict[str, BlockSink] = {}
        """transfer id -> its newest stream's sink."""
        self._abandoned: dict[str, float] = {}
        """transfer id -> when its sender was reported gone."""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.receiver: KVReceiver | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 30.0) -> str:
        """Bind on ``transfer.host`` (its own thread and loop); returns ``host:port``.

        Raises:
            RuntimeError: the server did not come up within ``timeout_s``.
        """
        if self._thread is not None:
            return self.address
        ready, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name="kvcluster-pd-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or failure:
            raise RuntimeError(f"KV receiver did not start: {failure or 'timeout'}")
        return self.address

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    # ------------------------------------------------------------ vLLM's worker thread

    def expect(self, spec: RecvSpec) -> None:
        with self._lock:
            self._expected[spec.transfer_id] = _Expected(spec, time.monotonic() + spec.timeout_s)
            sink = self._sinks.get(spec.transfer_id)
        if sink is not None:  # the stream came first: write what it holds now
            sink.register(BlockTarget.of(spec))

    def abandon(self, transfer_id: str) -> None:
        """Nobody will stream ``transfer_id`` (its prefill failed): stop waiting."""
        with self._lock:
            self._abandoned[transfer_id] = time.monotonic()

    def poll(self, finished_req_ids: set[str]) -> tuple[set[str], set[int]]:
        """Requests done receiving, and their blocks vLLM must compute.

        ``finished_req_ids``: requests vLLM finished (aborted) since the last poll."""
        now = time.monotonic()
        done: set[str] = set()
        invalid: set[int] = set()
        with self._lock:
            for transfer_id, expected in list(self._expected.items()):
                why = self._why_done(transfer_id, expected, finished_req_ids, now)
                if why is None:
                    continue
                del self._expected[transfer_id]
                self._abandoned.pop(transfer_id, None)
                sink = self._sinks.pop(transfer_id, None)
                loaded = sink.release() if sink is not None else 0
                spec = expected.spec
                done.add(spec.request_id)
                if spec.request_id not in finished_req_ids:
                    invalid.update(self._account(spec, loaded, why or (sink and sink.broken)))
            self._expire(now)
        return done, invalid

    def snapshot(self) -> dict:
        with self._lock:
            streams = {tid: {"decoded_tokens": s.decoded_end, "done": s.done}
                       for tid, s in self._sinks.items()}
            return {"address": self.address, "streams": streams,
                    "expected": sorted(self._expected), **vars(self.stats),
                    "last_failures": list(self.stats.last_failures),
                    "data_plane": self.receiver.data_plane_stats() if self.receiver else {}}

    # ------------------------------------------------------------ helpers

    def _why_done(self, transfer_id: str, expected: _Expected, finished: set[str],
                  now: float) -> str | None:
        """None: still receiving; "": the stream closed; else why it ends unfilled."""
        sink = self._sinks.get(transfer_id)
        if expected.spec.request_id in finished:
            return "vLLM finished the request"
        if sink is not None and sink.done:
            return ""
        if transfer_id in self._abandoned:
            return "sender gone"
        if now > expected.deadline_s:
            return f"no complete stream within {expected.spec.timeout_s:.1f} s"
        return None

    def _account(self, spec: RecvSpec, loaded: int, why: str) -> list[int]:
        """Count the outcome; returns the blocks that hold no streamed KV."""
        B = self.paged.shape.block_size
        num_ok = min(len(spec.block_ids), loaded // B)
        self.stats.tokens_written += num_ok * B
        if num_ok == len(spec.block_ids):
            self.stats.requests_filled += 1
            return []
        self.stats.requests_short += 1
        message = (f"request {spec.transfer_id}: {num_ok * B} of "
                   f"{spec.end_token - spec.first_token} tokens streamed ({why or 'short'})")
        self.stats.last_failures = (self.stats.last_failures + [message])[-8:]
        log.warning("%s; vLLM computes the rest", message)
        return list(spec.block_ids[num_ok:])

    def _expire(self, now: float) -> None:
        """Streams nobody registered (vLLM had the prefix cached), old abandons."""
        keep_s = self.config.transfer.unclaimed_result_s
        for transfer_id, sink in list(self._sinks.items()):
            if (transfer_id not in self._expected and sink.done
                    and now - sink.opened_s > keep_s):
                del self._sinks[transfer_id]
                sink.release()
        for transfer_id, when in list(self._abandoned.items()):
            if transfer_id not in self._expected and now - when > keep_s:
                del self._abandoned[transfer_id]

    def _open_sink(self, header: StreamHeader) -> BlockSink:
        """The receiver's loop: a new stream (a resent one replaces the old)."""
        sink = BlockSink(self.paged, header.token_ids)
        with self._lock:
            old = self._sinks.get(header.request_id)
            self._sinks[header.request_id] = sink
            expected = self._expected.get(header.request_id)
            self.stats.streams_opened += 1
        if old is not None:
            old.release()
        if expected is not None:
            sink.register(BlockTarget.of(expected.spec))
        asyncio.ensure_future(self._claim(header.request_id))
        return sink

    async def _claim(self, transfer_id: str) -> None:
        """Take the receiver's result (it would keep it), log a failed stream."""
        assert self.receiver is not None
        try:
            result = await self.receiver.wait_result(transfer_id)
        except Exception as exc:  # noqa: BLE001 - the sink's own state decides
            log.debug("stream %s: no result (%r)", transfer_id, exc)
            return
        if not result.status.ok:
            log.warning("stream %s: %s", transfer_id, result.status.message)

    def _run(self, ready: threading.Event, failure: list) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(ready))
        except Exception as exc:  # noqa: BLE001 - reported to start()
            failure.append(repr(exc))
            ready.set()
            log.exception("KV receiver stopped")
        finally:
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        from kvstore.codec.factory import level_set

        self._stop = asyncio.Event()
        self.receiver = KVReceiver(self.layout, level_set(config=self.config.codec),
                                   self._open_sink, self.config.transfer, RecomputeSpeed())
        server = TransferServer(self.receiver, self.config.transfer,
                                ServerSecurity.internal(self.config.security))
        await server.start()
        self.address = server.address
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)
            self.receiver.close()
