"""PrefillWorker: compute a prompt's KV and hand it to a decode worker.

    task -> chunk keys -> cached prefix from the kvstore (any tier)
         -> prefill of the rest -> new chunks into the kvstore (KV events)
         -> adaptive gRPC stream of every full chunk to the decode worker

Only whole store chunks travel: the decode worker computes the short tail
(under one chunk) itself, so the transfer never carries a block that can
still change. Compute runs on one worker thread (the engine is not
thread-safe); the asyncio loop stays free for health calls and streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvcluster.common.config import ClusterConfig
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.engine.attention_importance import prefill_with_importance
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.observability.logs import request_context
from kvcluster.transfer.source import ChunkSource
from kvcluster.worker.node import WorkerNode
from kvcluster.worker.relay import drain
from kvcluster.worker.sender_pool import SenderPool
from kvstore.codec.hint import chunk_hints
from prefill_worker.base import PrefillWorkerBase
from prefill_worker.warm_up import warm_up
from router.event_bus import EventBus

log = logging.getLogger(__name__)


class PrefillWorker(PrefillWorkerBase):
    def __init__(self, config: ClusterConfig, instance_id: str,
                 runner: ModelRunner | None = None, bus: EventBus | None = None):
        super().__init__(config, instance_id)
        self.node = WorkerNode(config, instance_id, "prefill", runner, bus)
        self.senders = SenderPool(config, self.transfer_metrics)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"prefill-{instance_id}")

    def load(self):
        return self.node.load(queued_prefill_tokens=self._queued_tokens)

    async def start(self, kv_events_publish: str = "") -> None:
        """The model loaded in the constructor and events go through the node's bus; the
        engine and every codec level run once here, before the first request (warm_up)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._compute, warm_up, self.node.runner, self.senders.levels,
                                   self.config.transfer.chunk_tokens)

    def info(self) -> dict:
        runner = self.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity, "engine": "native"}

    def registries(self) -> list:
        return [self.metrics.registry, self.transfer_metrics.registry,
                self.node.store.metrics.registry]

    def take_event_batches(self, resync: bool) -> list:
        return drain(self.node.bus, self.instance_id, resync)

    async def stats(self) -> dict:
        lookups = self.metrics.value("kvcluster_worker_prefix_lookup_chunks_total")
        return dict(self.node.stats(), lookup_chunks=lookups,
                    data_plane={"data_plane": self.config.transfer.data_plane,
                                "transfers": self.senders.data_plane_counts()})

    async def _prefill(self, task: PrefillTask) -> PrefillResult:
        loop = asyncio.get_running_loop()
        result, keys, kv, importance = await loop.run_in_executor(
            self._compute, self._run, task, time.perf_counter())
        self.metrics.prefill_seconds.observe(result.prefill_s)
        # the new chunks go into the store while the KV streams (not before it)
        saving = loop.run_in_executor(self._compute, self._save, task, result, keys, kv)
        try:
            if task.decode_target and kv is not None:
                await self._send_kv(task, kv, importance, result)
        finally:
            await saving
        log.info("prefill done: prompt=%d cached=%d computed=%d sent=%d B in %.3f+%.3f s",
                 result.num_prompt_tokens, result.num_cached_tokens, result.num_computed_tokens,
                 result.wire_bytes, result.prefill_s, result.transfer_s)
        return result

    async def close(self) -> None:
        await self.senders.close()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self.node.close()

    # ------------------------------------------------------------ helpers

    def _run(self, task: PrefillTask, submitted: float):
        """Worker thread: load cached chunks, compute the rest.

        Returns:
            The result so far, the prompt's chunk keys, its whole chunks' KV
            ``[L, 2, num_full, H, D]`` (None without a whole chunk) and the attention
            importance for the encode hints (or None).
        """
        with request_context(task.request_id):
            began = time.perf_counter()
            keys = self.node.chunk_keys(task.token_ids, task.tenant)
            num_full = len(keys) * self.node.chunk_tokens
            result = PrefillResult(task.request_id, len(task.token_ids), num_full,
                                   queue_s=began - submitted)
            if not keys:
                return result, keys, None, None
            seq = Sequence(task.request_id, list(task.token_ids[:num_full]))
            self.metrics.lookup_chunks.inc(len(keys))
            block_ids, result.cached_tokens_by_tier = self.node.load_prefix(keys)
            result.prefix_load_s = time.perf_counter() - began
            try:
                kv, importance = self._compute_kv(seq, block_ids)  # kv [L, 2, num_full, H, D]
            finally:
                self.node.runner.free(seq)
            result.num_computed_tokens = num_full - len(block_ids) * self.node.layout.block_size
            result.prefill_s = time.perf_counter() - began - result.prefix_load_s
            return result, keys, kv, importance

    def _save(self, task: PrefillTask, result: PrefillResult, keys, kv) -> None:
        """Worker thread: store the chunks this prefill computed (those after the cached
        prefix), under the keys :meth:`_run` hashed."""
        if kv is None or not result.num_computed_tokens:
            return
        with request_context(task.request_id):
            num_cached = result.num_transferred_tokens - result.num_computed_tokens
            self.node.save_chunks(keys[num_cached // self.node.chunk_tokens:],
                                  kv[:, :, num_cached:], task.tenant)

    def _compute_kv(self, seq: Sequence, cached_blocks: list[int]):
        """The sequence's KV, and its attention importance ``[L, T]`` when
        ``codec.attention_hint`` is on and the prefill computed something (else None)."""
        runner = self.node.runner
        if cached_blocks:
            seq.attach_cached(cached_blocks, len(cached_blocks) * runner.block_size)
        importance = None
        if seq.num_computed_tokens < seq.num_tokens:
            runner.allocate_blocks(seq, seq.num_tokens)
            with torch.inference_mode():
                if self.config.codec.attention_hint:
                    _, importance = prefill_with_importance(runner, seq)
                else:
                    runner.prefill(seq)
        return runner.cache.export_blocks(seq.block_table), importance

    async def _send_kv(self, task: PrefillTask, kv: torch.Tensor, importance,
                       result: PrefillResult) -> None:
        num_tokens, chunk_tokens = result.num_transferred_tokens, self.config.transfer.chunk_tokens
        hints = () if importance is None else chunk_hints(importance[:, :num_tokens], chunk_tokens)
        source = ChunkSource(task.token_ids[:num_tokens], self.node.layout,
                             self.senders.levels, chunk_tokens, kv=kv, hints=hints)
        sent = await self.senders.sender(task.decode_target).send(source, task.request_id,
                                                                  task.slo_ms or None)
        result.transfer_s = sent.elapsed_s
        self._record_transfer(task, result, self.node.layout, sent.ok, sent.message,
                              sent.bytes_sent, sent.levels, sent.data_plane)
