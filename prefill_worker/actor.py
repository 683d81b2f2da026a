"""The Ray actor around a prefill worker (:mod:`prefill_worker.factory`: the native
:class:`PrefillWorker` or a vLLM one): thin, async, small messages only."""

from __future__ import annotations

import os

from kvcluster.common.config import ClusterConfig, from_dict, worker_config_digest
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.observability.log_tail import install_worker_logging
from kvcluster.observability.metrics import MetricsEndpoint, advertised
from prefill_worker.factory import build_prefill_worker


class PrefillActor:
    def __init__(self, config: dict, instance_id: str, kv_events_publish: str = ""):
        """``kv_events_publish``: the front end's ZMQ subscriber for this pool, for
        engines that publish their own KV events (vLLM)."""
        self.logs = install_worker_logging()
        cluster_config = from_dict(ClusterConfig, config)
        self.config_digest = worker_config_digest(cluster_config)
        """Front ends attach only to pools that run their worker config."""
        self.worker = build_prefill_worker(cluster_config, instance_id)
        self.metrics = MetricsEndpoint(self.worker.registries())
        self.metrics_address = advertised(self.metrics.start(cluster_config.transfer.host))
        self.kv_events_publish = kv_events_publish
        self._started = False

    async def ready(self) -> str:
        """Start the worker (once: a vLLM engine, the native warm-up); returns the
        instance id."""
        if not self._started:
            self._started = True
            await self.worker.start(self.kv_events_publish)
        return self.worker.instance_id

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await self.worker.prefill(task)

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        return dict(self.worker.info(), metrics_address=self.metrics_address,
                    pid=os.getpid(), config_digest=self.config_digest)

    async def poll(self, resync: bool = False):
        """Heartbeat: (load, relayed KV event batches, "" (no receiver)).

        Also (re)starts the worker: after Ray restarts this actor, the first poll
        brings its engine back (before, every prefill on it failed: never started).
        """
        await self.ready()
        return self.worker.load(), self.worker.take_event_batches(resync), ""

    async def stats(self) -> dict:
        return dict(await self.worker.stats(), role="prefill", pid=os.getpid(),
                    metrics_address=self.metrics_address)

    async def recent_logs(self) -> list[dict]:
        """The last log lines of this actor (logger, level, msg, request_id)."""
        return list(self.logs.entries)
