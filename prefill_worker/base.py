"""What both prefill workers share, whatever their engine: queue admission and the
KV senders to decode instances.

    PrefillWorkerBase
      PrefillWorker       (prefill_worker.worker)       kvcluster's native engine
      VLLMPrefillWorker   (prefill_worker.vllm_worker)  a vLLM v1 engine + kvcluster's connector

:func:`prefill_worker.factory.build_prefill_worker` picks one by ``config.engine.kind``.
"""

from __future__ import annotations

import abc
import logging

from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import OverloadedError
from kvcluster.common.layout import KVLayout
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.observability.logs import request_context
from kvcluster.observability.metrics import TransferMetrics, WorkerMetrics
from kvcluster.transfer.security import ChannelSecurity
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from kvstore.codec.factory import sender_levels

log = logging.getLogger(__name__)


class PrefillWorkerBase(abc.ABC):
    def __init__(self, config: ClusterConfig, instance_id: str):
        self.config = config
        self.instance_id = instance_id
        self.levels = sender_levels(config.transfer.best_level, config.transfer.policy,
                                    config.codec)
        self.channel_security = ChannelSecurity.internal(config.security)
        """What this worker's senders present to decode workers: the cluster secret."""
        self._senders: dict[str, KVSender] = {}
        self._queued_tokens = 0
        self._num_queued = 0
        self.metrics = WorkerMetrics(instance_id, "prefill")
        self.metrics.watch_queue(lambda: self._queued_tokens, lambda: 0)
        self.transfer_metrics = TransferMetrics()

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        """Compute (or load) the KV of ``task``'s whole chunks and send it on.

        Raises:
            OverloadedError: ``workers.max_queue`` tasks are already waiting.
        """
        if self._num_queued >= self.config.workers.max_queue:
            self.metrics.count("overloaded")
            raise OverloadedError(f"prefill worker {self.instance_id} has "
                                  f"{self._num_queued} queued requests")
        self._num_queued += 1
        self._queued_tokens += len(task.token_ids)
        try:
            with request_context(task.request_id):
                result = await self._prefill(task)
            self.metrics.count("ok")
            return result
        except Exception:
            self.metrics.count("error")
            raise
        finally:
            self._num_queued -= 1
            self._queued_tokens -= len(task.token_ids)

    @abc.abstractmethod
    async def _prefill(self, task: PrefillTask) -> PrefillResult:
        """One admitted task, in its request's log context."""

    async def _send(self, task: PrefillTask, source: ChunkSource, layout: KVLayout,
                    result: PrefillResult) -> None:
        """Stream ``source`` to ``task.decode_target``; the outcome goes into ``result``
        (a failed transfer is logged, not raised: the decoder then recomputes)."""
        sent = await self._sender(task.decode_target).send(source, task.request_id,
                                                           task.slo_ms or None)
        result.transfer_s = sent.elapsed_s
        result.wire_bytes = sent.bytes_sent
        result.levels = list(sent.levels)
        result.raw_bytes = layout.with_dtype("float16").bytes_per_chunk(
            result.num_transferred_tokens)
        result.transfer_ok = sent.status is not None and sent.status.ok
        result.message = sent.error or (sent.status.message if sent.status else "")
        result.data_plane = sent.data_plane
        if not result.transfer_ok:
            log.warning("request %s: KV transfer to %s failed: %s", task.request_id,
                        task.decode_target, result.message)

    def _sender(self, target: str) -> KVSender:
        if target not in self._senders:
            self._senders[target] = KVSender(target, self.levels, self.config.transfer,
                                             security=self.channel_security,
                                             metrics=self.transfer_metrics)
        return self._senders[target]

    def data_plane_stats(self) -> dict:
        """Transfers per data plane over every receiver, for ``kvcluster status``."""
        counts: dict[str, int] = {}
        for sender in self._senders.values():
            for plane, n in sender.data_planes.used.items():
                counts[plane] = counts.get(plane, 0) + n
        return {"data_plane": self.config.transfer.data_plane, "transfers": counts}

    async def _close_senders(self) -> None:
        for sender in self._senders.values():
            await sender.close()
