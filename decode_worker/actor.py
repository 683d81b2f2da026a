"""The Ray actor around :class:`DecodeWorker`: thin, async, small messages only."""

from __future__ import annotations

import os

from decode_worker.worker import DecodeWorker
from kvcluster.common.config import ClusterConfig, from_dict, worker_config_digest
from kvcluster.common.tasks import DecodeTask
from kvcluster.observability.log_tail import install_worker_logging
from kvcluster.observability.metrics import MetricsEndpoint, advertised
from kvcluster.worker.relay import drain


class DecodeActor:
    def __init__(self, config: dict, instance_id: str):
        self.logs = install_worker_logging()
        cluster_config = from_dict(ClusterConfig, config)
        self.config_digest = worker_config_digest(cluster_config)
        """Front ends attach only to pools that run their worker config."""
        self.worker = DecodeWorker(cluster_config, instance_id)
        self.metrics = MetricsEndpoint([self.worker.metrics.registry,
                                        self.worker.node.store.metrics.registry])
        self.metrics_address = advertised(self.metrics.start(self.worker.config.transfer.host))
        self.address = ""

    async def ready(self) -> str:
        """Start the KV receiver (once); returns its host:port."""
        if not self.address:
            self.address = _reachable(await self.worker.start())
        return self.address

    async def generate(self, task: DecodeTask):
        """Streaming generator (call with ``num_returns="streaming"``)."""
        async for step in self.worker.generate(task):
            yield step

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        runner = self.worker.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity, "metrics_address": self.metrics_address,
                "pid": os.getpid(), "config_digest": self.config_digest}

    async def abandon_kv(self, request_id: str) -> None:
        self.worker.abandon_kv(request_id)

    async def poll(self, resync: bool = False):
        """Heartbeat: (load, relayed KV event batches, receiver address).

        Also (re)starts the receiver: after Ray restarts this actor, the first
        poll brings it back on a new port, which the front end then uses.
        """
        address = await self.ready()
        return (self.worker.load(), drain(self.worker.node.bus, self.worker.instance_id, resync),
                address)

    async def stats(self) -> dict:
        lookups = self.worker.metrics.value("kvcluster_worker_prefix_lookup_chunks_total")
        return dict(self.worker.node.stats(), role="decode", pid=os.getpid(),
                    metrics_address=self.metrics_address, lookup_chunks=lookups,
                    data_plane=self.worker.receiver.data_plane_stats())

    async def recent_logs(self) -> list[dict]:
        """The last log lines of this actor (logger, level, msg, request_id)."""
        return list(self.logs.entries)


def _reachable(address: str) -> str:
    """A wildcard bind (0.0.0.0, ::) is advertised as this node's IP for other nodes."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"
