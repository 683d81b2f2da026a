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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from decode_worker.base import DecodeWorkerBase
from decode_worker.paged_sink import PagedCacheSink
from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import InvalidRequestError, OverloadedError
from kvcluster.common.tasks import DecodeStep, DecodeTask
from kvcluster.engine.block_manager import OutOfBlocksError
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
from kvcluster.worker.kv_wait import KVWaits
from kvcluster.worker.node import WorkerNode
from kvcluster.worker.relay import drain
from kvstore.codec.factory import level_set
from router.event_bus import EventBus

log = logging.getLogger(__name__)


@dataclass
class _Active:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived_s: float
    first_token_s: float = 0.0
    first_token_time: float = 0.0
    kv_source: str = "none"
    tenant: str = ""
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    """Tokens attached from a transfer or the local store, by source."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    kept: Future | None = None
    """The keeper's job storing this prompt's new chunks: done before the final step,
    so the KV events of a finished request describe where its chunks now are."""


class DecodeWorker(DecodeWorkerBase):
    def __init__(self, config: ClusterConfig, instance_id: str,
                 runner: ModelRunner | None = None, bus: EventBus | None = None):
        self.config = config
        self.node = WorkerNode(config, instance_id, "decode", runner, bus)
        self.engine = LLMEngine(self.node.runner)
        self.speed = RecomputeSpeed()
        self.receiver = KVReceiver(self.node.layout, level_set(config=config.codec),
                                   self._open_sink, config.transfer, self.speed)
        self.server = TransferServer(self.receiver, config.transfer,
                                     ServerSecurity.internal(config.security))
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._active: dict[str, _Active] = {}
        self._kv_waits = KVWaits()
        self._keeper = ThreadPoolExecutor(1, thread_name_prefix=f"keep-{instance_id}")
        """Stores prompts' chunks off the token path (kvstore puts, disk spills)."""
        self.metrics = WorkerMetrics(instance_id, "decode")
        self.metrics.watch_queue(lambda: 0, lambda: len(self._active))
        self._thread = threading.Thread(target=self._loop, name=f"decode-{instance_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def instance_id(self) -> str:
        return self.node.instance_id

    async def start(self, kv_events_publish: str = "") -> str:
        """Start the KV receiver; returns its ``host:port``. (Its KV events go out
        through the node's publisher, so ``kv_events_publish`` is not used.)"""
        await self.server.start()
        if not self.server.security.authenticates:
            log.warning("KV receiver %s takes streams from anyone: no security."
                        "internal_token or internal mTLS configured", self.server.address)
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
                if step.finish_reason is not None and active.kept is not None:
                    await asyncio.wrap_future(active.kept)
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

    def info(self) -> dict:
        runner = self.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity, "engine": "native"}

    def registries(self) -> list:
        return [self.metrics.registry, self.node.store.metrics.registry]

    def take_event_batches(self, resync: bool) -> list:
        return drain(self.node.bus, self.instance_id, resync)

    async def stats(self) -> dict:
        lookups = self.metrics.value("kvcluster_worker_prefix_lookup_chunks_total")
        return dict(self.node.stats(), lookup_chunks=lookups,
                    data_plane=self.receiver.data_plane_stats())

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
        self._keeper.shutdown(wait=True)
        self.node.close()

    # ------------------------------------------------------------ KV arrival

    async def _prefix_blocks(self, task: DecodeTask, active: _Active) -> list[int]:
        """Blocks holding the request's prefix, handed to the engine with the request:
        from the stream, else from the local store when it holds more than the
        engine's own registered blocks (those the engine matches by itself, no copy)."""
        if task.expect_kv:
            began = time.perf_counter()
            blocks = await self._received_blocks(task, active)
            active.stage_ms["kv_transfer"] = _ms_since(began)
            if blocks:
                active.kv_source = "transfer"
                return blocks
            active.kv_source = "recompute"
        began = time.perf_counter()
        blocks = await self._stored_blocks(task, active)
        active.stage_ms["prefix_load"] = _ms_since(began)
        return blocks

    async def _stored_blocks(self, task: DecodeTask, active: _Active) -> list[int]:
        keys = self.node.chunk_keys(task.token_ids[:-1], task.tenant)
        if not keys:
            return []
        self.metrics.lookup_chunks.inc(len(keys))
        with self._lock:
            held = self.engine.num_prefix_tokens(task.token_ids, task.tenant)
        if self.node.store.lookup(keys).num_chunks * self.node.chunk_tokens <= held:
            if held:  # the engine attaches its own blocks when it schedules the request
                active.kv_source = "prefix-cache"
            return []
        loop = asyncio.get_running_loop()
        kv, by_tier = await loop.run_in_executor(None, self.node.read_prefix, keys)
        if kv is None:
            return []
        with self._lock:
            blocks = self.node.import_prefix(kv)
        active.kv_source = "local-store"
        active.cached_tokens_by_tier = by_tier
        return blocks

    def abandon_kv(self, request_id: str) -> None:
        """The sender is gone before streaming (its prefill failed): stop waiting."""
        self._kv_waits.abandon(request_id)

    async def _received_blocks(self, task: DecodeTask, active: _Active) -> list[int]:
        result, why = await self._kv_waits.wait(self.receiver, task.request_id,
                                                task.kv_timeout_s)
        if result is None:
            log.warning("request %s: no KV (%s); recomputing", task.request_id, why)
            return []
        sink: PagedCacheSink = result.sink
        blocks = list(sink.seq.block_table)
        num_tokens = sink.seq.num_tokens
        if not result.status.ok or num_tokens > len(task.token_ids) \
                or tuple(sink.seq.token_ids) != tuple(task.token_ids[:num_tokens]):
            log.warning("request %s: KV stream unusable (%s); recomputing", task.request_id,
                        result.status.message)
            sink.discard()
            return []
        active.cached_tokens_by_tier = {"transfer": num_tokens}
        return blocks

    def _open_sink(self, header: StreamHeader) -> PagedCacheSink:
        """Receiver callback: allocate the request's blocks for the stream."""
        seq = Sequence(header.request_id, list(header.token_ids))
        return PagedCacheSink(self.node.runner, seq, self.speed, self._lock)

    def _keep(self, token_ids, block_ids: list[int], tenant: str) -> Future | None:
        """Store the whole chunks of ``token_ids`` (KV in ``block_ids``) that this
        worker's kvstore lacks, so the next turn can start here. The caller holds the
        engine lock: the new chunks are copied now (a few ms), and stored (tier
        placement, spills, disk writes) on the keeper thread, off the token path."""
        keys, start, kv = self.node.export_new_chunks(token_ids, block_ids, tenant)
        return self._keeper.submit(self._keep_now, keys, start, kv, tenant) if keys else None

    def _keep_now(self, keys, start: int, kv, tenant: str) -> None:
        try:
            self.node.store.put(keys, kv, tenant=tenant, start=start)
            self.node.publisher.flush()  # the events out now, not at the next flush tick
        except Exception:  # noqa: BLE001 - a failed keep costs a later hit, not this request
            log.exception("keeping %d chunks in the store failed", len(keys) - start)

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
            if isinstance(exc, OutOfBlocksError) and self.node.runner.blocks.num_used:
                time.sleep(0.002)  # blocks held by streams still being received: wait
                return []
            log.exception("decode worker %s: engine step failed", self.instance_id)
            for request_id in list(self.engine.sequences):
                self._fail(request_id, exc)
            return []

    def _deliver(self, output: StepOutput) -> None:
        active = self._active.get(output.request_id)
        if active is None:
            return
        active.loop.call_soon_threadsafe(active.queue.put_nowait, DecodeStep(output.token_id))
        if not active.first_token_s:
            self._first_token(output.request_id, active)
        if output.finished:
            with self._lock:
                seq = self.engine.pop(output.request_id)
            active.loop.call_soon_threadsafe(active.queue.put_nowait, self._final(seq, active))

    def _first_token(self, request_id: str, active: _Active) -> None:
        """Time the first token's stages; keep the prompt's new whole chunks in the store
        (whatever filled them: a transfer, the local store, this engine)."""
        active.first_token_s = time.perf_counter() - active.arrived_s
        active.first_token_time = time.time()
        with self._lock:
            seq = self.engine.sequences.get(request_id)
            if seq is None:
                return
            active.stage_ms["queue"] = (seq.scheduled_s - seq.arrival_s) * 1e3
            active.stage_ms["first_decode_step"] = (seq.first_token_s - seq.scheduled_s) * 1e3
            num_blocks = -(-seq.num_prompt_tokens // self.engine.block_size)
            active.kept = self._keep(seq.token_ids[: seq.num_prompt_tokens],
                                     seq.block_table[:num_blocks], active.tenant)

    def _final(self, seq: Sequence, active: _Active) -> DecodeStep:
        by_tier = dict(active.cached_tokens_by_tier)
        engine_cached = seq.num_cached_tokens - sum(by_tier.values())
        if engine_cached > 0:
            by_tier["prefix_cache"] = engine_cached
        return DecodeStep(finish_reason=seq.finish_reason, num_cached_tokens=seq.num_cached_tokens,
                          kv_source=active.kv_source, first_token_s=active.first_token_s,
                          first_token_time=active.first_token_time,
                          cached_tokens_by_tier=by_tier, stage_ms=dict(active.stage_ms))

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


def _ms_since(began: float) -> float:
    return (time.perf_counter() - began) * 1e3
