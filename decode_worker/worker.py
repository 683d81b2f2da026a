"""DecodeWorker: receive a prompt's KV, then generate with continuous batching.

    KV stream (gRPC) -> PagedCacheSink: decoded chunks land in paged blocks
    DecodeTask (Ray) -> wait for that stream's result -> LLMEngine.add_request
                        with those blocks as the cached prefix -> tokens

One engine thread steps the batch; every engine and block call holds ``_lock``
(the receiver's sinks too), so requests join and leave between steps. Every block
comes from the runner's one BlockManager, whichever path fills it (the engine, a
received stream, the local kvstore). Received chunks also go into this worker's
kvstore, so the next turn of a conversation can start here without a transfer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from decode_worker.paged_sink import PagedCacheSink
from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import InvalidRequestError, OverloadedError
from kvcluster.common.tasks import DecodeStep, DecodeTask
from kvcluster.engine.llm_engine import LLMEngine, StepOutput
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.observability.logs import request_context
from kvcluster.observability.metrics import WorkerMetrics
from kvcluster.transfer.messages import StreamHeader
from kvcluster.transfer.receiver import KVReceiver
from kvcluster.transfer.security import ServerSecurity
from kvcluster.transfer.server import TransferServer
from kvcluster.transfer.sink import RecomputeSpeed
from kvcluster.worker.node import WorkerNode
from kvstore.codec.factory import level_set
from router.event_bus import EventBus

log = logging.getLogger(__name__)


@dataclass
class _Active:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived_s: float
    first_token_s: float = 0.0
    kv_source: str = "none"
    tenant: str = ""


class DecodeWorker:
    def __init__(self, config: ClusterConfig, instance_id: str,
                 runner: ModelRunner | None = None, bus: EventBus | None = None):
        self.config = config
        self.node = WorkerNode(config, instance_id, "decode", runner, bus)
        self.engine = LLMEngine(self.node.runner)
        self.speed = RecomputeSpeed()
        self.receiver = KVReceiver(self.node.layout, level_set(config=config.codec),
                                   self._open_sink, config.transfer, self.speed)
        self.server = TransferServer(self.receiver, config.transfer,
                                     ServerSecurity.from_config(config.security))
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._active: dict[str, _Active] = {}
        self._abandoned: dict[str, asyncio.Event] = {}
        self.metrics = WorkerMetrics(instance_id, "decode")
        self.metrics.watch_queue(lambda: 0, lambda: len(self._active))
        self._thread = threading.Thread(target=self._loop, name=f"decode-{instance_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def instance_id(self) -> str:
        return self.node.instance_id

    async def start(self) -> str:
        """Start the KV receiver; returns its ``host:port``."""
        await self.server.start()
        return self.server.address

    async def generate(self, task: DecodeTask) -> AsyncIterator[DecodeStep]:
        """Tokens of ``task`` as they are sampled, then one final summary step.

        Raises:
            OverloadedError: ``workers.max_queue`` requests are already active.
            InvalidRequestError: the prompt does not fit this worker's engine.
        """
        if len(self._active) >= self.config.workers.max_queue:
            self.metrics.count("overloaded")
            raise OverloadedError(f"decode worker {self.instance_id} has "
                                  f"{len(self._active)} active requests")
        active = _Active(asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter(),
                         tenant=task.tenant)
        self._active[task.request_id] = active
        try:
            with request_context(task.request_id):  # not across yields: the consumer's context
                blocks = await self._prefix_blocks(task, active)
                self._add_request(task, blocks)
            self._wake.set()
            num_tokens = 0
            async for step in self._drain(active):
                num_tokens += step.finish_reason is None
                yield step
            with request_context(task.request_id):
                self._observe_done(active, num_tokens)
        except Exception:
            self.metrics.count("error")
            raise
        finally:
            self._abort(task.request_id)

    def load(self):
        return self.node.load(active_decode_requests=len(self._active))

    def _add_request(self, task: DecodeTask, blocks: list[int]) -> None:
        with self._lock:
            try:
                self.engine.add_request(task.request_id, task.token_ids, task.params,
                                        cached_blocks=blocks, tenant_salt=task.tenant)
            except ValueError as exc:  # too long for this engine: the request's fault
                self.node.runner.blocks.free(blocks)  # the engine did not take them
                raise InvalidRequestError(str(exc)) from exc

    def _observe_done(self, active: _Active, num_tokens: int) -> None:
        elapsed_s = time.perf_counter() - active.arrived_s
        self.metrics.count("ok")
        self.metrics.decode_seconds.observe(elapsed_s)
        self.metrics.decode_first_token.observe(active.first_token_s)
        log.info("decode done: kv=%s tokens=%d first token %.3f s, total %.3f s",
                 active.kv_source, num_tokens, active.first_token_s, elapsed_s)

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        await self.server.stop(0)
        self.receiver.close()
        self._thread.join(timeout=5)
        self.node.close()

    # ------------------------------------------------------------ KV arrival

    async def _prefix_blocks(self, task: DecodeTask, active: _Active) -> list[int]:
        """Blocks holding the request's prefix: from the stream, else the local store."""
        if task.expect_kv:
            blocks = await self._received_blocks(task)
            if blocks:
                active.kv_source = "transfer"
                return blocks
            active.kv_source = "recompute"
        keys = self.node.chunk_keys(task.token_ids[:-1], task.tenant)
        if keys:
            with self._lock:
                self.metrics.lookup_chunks.inc(len(keys))
                blocks, _ = self.node.load_prefix(keys)
            if blocks:
                active.kv_source = "local-store"
                return blocks
        return []

    def abandon_kv(self, request_id: str) -> None:
        """The sender is gone before streaming (its prefill failed): stop waiting."""
        self._abandoned.setdefault(request_id, asyncio.Event()).set()

    async def _received_blocks(self, task: DecodeTask) -> list[int]:
        abandoned = self._abandoned.setdefault(task.request_id, asyncio.Event())
        waiter = asyncio.ensure_future(self.receiver.wait_result(task.request_id,
                                                                 task.kv_timeout_s))
        giver_up = asyncio.ensure_future(abandoned.wait())
        try:
            await asyncio.wait([waiter, giver_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            giver_up.cancel()
            self._abandoned.pop(task.request_id, None)
        if not waiter.done() or waiter.exception() is not None:
            waiter.cancel()
            log.warning("request %s: no KV (%s); recomputing", task.request_id,
                        "sender gone" if abandoned.is_set() else
                        f"none within {task.kv_timeout_s:.1f} s")
            return []
        result = waiter.result()
        sink: PagedCacheSink = result.sink
        blocks = list(sink.seq.block_table)
        num_tokens = sink.seq.num_tokens
        if not result.status.ok or num_tokens > len(task.token_ids) \
                or tuple(sink.seq.token_ids) != tuple(task.token_ids[:num_tokens]):
            log.warning("request %s: KV stream unusable (%s); recomputing", task.request_id,
                        result.status.message)
            sink.discard()
            return []
        await asyncio.get_running_loop().run_in_executor(None, self._keep, task, sink)
        return blocks

    def _open_sink(self, header: StreamHeader) -> PagedCacheSink:
        """Receiver callback: allocate the request's blocks for the stream."""
        seq = Sequence(header.request_id, list(header.token_ids))
        return PagedCacheSink(self.node.runner, seq, self.speed, self._lock)

    def _keep(self, task: DecodeTask, sink: PagedCacheSink) -> None:
        """Store the received chunks so the next turn can hit here."""
        with self._lock:
            keys, kv = self.node.export_chunks(sink.seq.token_ids, sink.seq.block_table,
                                               task.tenant)
        self.node.save_chunks(keys, kv, task.tenant)

    def _keep_prompt(self, request_id: str, tenant: str) -> None:
        """Store a prompt this worker computed itself (colocated, or recomputed)."""
        with self._lock:
            seq = self.engine.sequences.get(request_id)
            if seq is None:
                return
            keys, kv = self.node.export_chunks(seq.token_ids[: seq.num_prompt_tokens],
                                               seq.block_table, tenant)
        self.node.save_chunks(keys, kv, tenant)

    # ------------------------------------------------------------ engine loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self.engine.has_unfinished()
                outputs = self._step() if busy else []
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
            for output in outputs:
                self._deliver(output)

    def _step(self) -> list[StepOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # fail the requests, keep the worker alive
            log.exception("decode worker %s: engine step failed", self.instance_id)
            for request_id in list(self.engine.sequences):
                self._fail(request_id, exc)
            return []

    def _deliver(self, output: StepOutput) -> None:
        active = self._active.get(output.request_id)
        if active is None:
            return
        if not active.first_token_s:
            active.first_token_s = time.perf_counter() - active.arrived_s
            if active.kv_source not in ("transfer", "local-store"):
                self._keep_prompt(output.request_id, active.tenant)
        steps = [DecodeStep(output.token_id)]
        if output.finished:
            with self._lock:
                seq = self.engine.pop(output.request_id)
            steps.append(DecodeStep(finish_reason=seq.finish_reason,
                                    num_cached_tokens=seq.num_cached_tokens,
                                    kv_source=active.kv_source,
                                    first_token_s=active.first_token_s))
        for step in steps:
            active.loop.call_soon_threadsafe(active.queue.put_nowait, step)

    def _fail(self, request_id: str, exc: Exception) -> None:
        with self._lock:
            self.engine.abort(request_id)
        active = self._active.get(request_id)
        if active is not None:
            active.loop.call_soon_threadsafe(active.queue.put_nowait, exc)

    async def _drain(self, active: _Active) -> AsyncIterator[DecodeStep]:
        while True:
            item = await active.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _abort(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        with self._lock:
            self.engine.abort(request_id)
