"""What both prefill workers share, whatever their engine: queue admission, metrics, and
how a transfer's outcome goes into the PrefillResult.

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

log = logging.getLogger(__name__)


class PrefillWorkerBase(abc.ABC):
    def __init__(self, config: ClusterConfig, instance_id: str):
        self.config = config
        self.instance_id = instance_id
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

    def _record_transfer(self, task: PrefillTask, result: PrefillResult, layout: KVLayout,
                         ok: bool, message: str, bytes_sent: int, levels, data_plane: str
                         ) -> None:
        """A stream's outcome into ``result`` (a failed one is logged, not raised: the
        decoder then recomputes)."""
        result.wire_bytes = bytes_sent
        result.levels = list(levels)
        result.raw_bytes = layout.with_dtype("float16").bytes_per_chunk(
            result.num_transferred_tokens)
        result.transfer_ok = ok
        result.message = message
        result.data_plane = data_plane
        if not ok:
            log.warning("request %s: KV transfer to %s failed: %s", task.request_id,
                        task.decode_target, message)
