"""The Ray actor around :class:`PrefillWorker`: thin, async, small messages only."""

from __future__ import annotations

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.runtime.relay import drain
from kvcluster.runtime.tasks import PrefillResult, PrefillTask
from prefill_worker.worker import PrefillWorker


class PrefillActor:
    def __init__(self, config: dict, instance_id: str):
        self.worker = PrefillWorker(from_dict(ClusterConfig, config), instance_id)

    async def ready(self) -> str:
        return self.worker.instance_id

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        return await self.worker.prefill(task)

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        runner = self.worker.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity}

    async def poll(self, resync: bool = False):
        """Heartbeat: (load, relayed KV event batches, "" (no receiver))."""
        return (self.worker.load(), drain(self.worker.node.bus, self.worker.instance_id, resync),
                "")

    async def stats(self) -> dict:
        return self.worker.node.stats()
