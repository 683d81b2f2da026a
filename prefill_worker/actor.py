"""The Ray actor around :class:`PrefillWorker`: thin, async, small messages only."""

from __future__ import annotations

import os

from kvcluster.common.config import ClusterConfig, from_dict, worker_config_digest
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.observability.log_tail import install_worker_logging
from kvcluster.observability.metrics import MetricsEndpoint, advertised
from kvcluster.worker.relay import drain
from prefill_worker.worker import PrefillWorker


class PrefillActor:
    def __init__(self, config: dict, instance_id: str):
        self.logs = install_worker_logging()
        cluster_config = from_dict(ClusterConfig, config)
        self.config_digest = worker_config_digest(cluster_config)
        """Front ends attach only to pools that run their worker config."""
        self.worker = PrefillWorker(cluster_config, instance_id)
        self.metrics = MetricsEndpoint([self.worker.metrics.registry,
                                        self.worker.transfer_metrics.registry,
                                        self.worker.node.store.metrics.registry])
        self.metrics_address = advertised(self.metrics.start(self.worker.config.transfer.host))

    async def ready(self) -> str:
        return self.worker.instance_id

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await self.worker.prefill(task)

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        runner = self.worker.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity, "metrics_address": self.metrics_address,
                "pid": os.getpid(), "config_digest": self.config_digest}

    async def poll(self, resync: bool = False):
        """Heartbeat: (load, relayed KV event batches, "" (no receiver))."""
        return (self.worker.load(), drain(self.worker.node.bus, self.worker.instance_id, resync),
                "")

    async def stats(self) -> dict:
        lookups = self.worker.metrics.value("kvcluster_worker_prefix_lookup_chunks_total")
        return dict(self.worker.node.stats(), role="prefill", pid=os.getpid(),
                    metrics_address=self.metrics_address, lookup_chunks=lookups,
                    data_plane=self.worker.data_plane_stats())

    async def recent_logs(self) -> list[dict]:
        """The last log lines of this actor (logger, level, msg, request_id)."""
        return list(self.logs.entries)
