"""The Ray actor around a decode worker (:mod:`decode_worker.factory`: the native
:class:`DecodeWorker` or a vLLM one): thin, async, small messages only."""

from __future__ import annotations

import contextlib
import os

from decode_worker.factory import build_decode_worker
from kvcluster.common.config import ClusterConfig, from_dict, worker_config_digest
from kvcluster.common.tasks import DecodeTask
from kvcluster.observability.log_tail import install_worker_logging
from kvcluster.observability.metrics import MetricsEndpoint, advertised


class DecodeActor:
    def __init__(self, config: dict, instance_id: str, kv_events_publish: str = ""):
        """``kv_events_publish``: the front end's ZMQ subscriber, for engines that publish
        their own KV events (vLLM); kept across Ray's restarts of this actor."""
        self.logs = install_worker_logging()
        cluster_config = from_dict(ClusterConfig, config)
        self.config_digest = worker_config_digest(cluster_config)
        """Front ends attach only to pools that run their worker config."""
        self.worker = build_decode_worker(cluster_config, instance_id)
        self.metrics = MetricsEndpoint(self.worker.registries())
        self.metrics_address = advertised(self.metrics.start(cluster_config.transfer.host))
        self.address = ""
        self.kv_events_publish = kv_events_publish
        self._started = False

    async def ready(self) -> str:
        """Start the worker (once: its KV receiver, a vLLM engine); returns the
        receiver's host:port ("" when it has none)."""
        if not self._started:
            self.address = _reachable(await self.worker.start(self.kv_events_publish))
            self._started = True
        return self.address

    async def generate(self, task: DecodeTask):
        """Streaming generator (call with ``num_returns="streaming"``)."""
        async with contextlib.aclosing(self.worker.generate(task)) as steps:
            async for step in steps:  # closed or cancelled: the worker aborts the request
                yield step

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        return dict(self.worker.info(), metrics_address=self.metrics_address,
                    pid=os.getpid(), config_digest=self.config_digest)

    async def abandon_kv(self, request_id: str) -> None:
        self.worker.abandon_kv(request_id)

    async def poll(self, resync: bool = False):
        """Heartbeat: (load, relayed KV event batches, receiver address).

        Also (re)starts the receiver: after Ray restarts this actor, the first
        poll brings it back on a new port, which the front end then uses.
        """
        address = await self.ready()
        return self.worker.load(), self.worker.take_event_batches(resync), address

    async def stats(self) -> dict:
        return dict(await self.worker.stats(), role="decode", pid=os.getpid(),
                    metrics_address=self.metrics_address)

    async def recent_logs(self) -> list[dict]:
        """The last log lines of this actor (logger, level, msg, request_id)."""
        return list(self.logs.entries)


def _reachable(address: str) -> str:
    """A wildcard bind (0.0.0.0, ::) is advertised as this node's IP for other nodes."""
    if not address:
        return ""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"
