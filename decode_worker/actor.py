"""The Ray actor around :class:`DecodeWorker`: thin, async, small messages only."""

from __future__ import annotations

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.runtime.relay import drain
from kvcluster.runtime.tasks import DecodeTask
from decode_worker.worker import DecodeWorker


class DecodeActor:
    def __init__(self, config: dict, instance_id: str):
        self.worker = DecodeWorker(from_dict(ClusterConfig, config), instance_id)
        self.address = ""

    async def ready(self) -> str:
        """Start the KV receiver (once); returns its host:port."""
        if not self.address:
            self.address = await self.worker.start()
        return self.address

    async def generate(self, task: DecodeTask):
        """Streaming generator (call with ``num_returns="streaming"``)."""
        async for step in self.worker.generate(task):
            yield step

    async def info(self) -> dict:
        """What the front end needs to hash like the workers do."""
        runner = self.worker.node.runner
        return {"model_id": runner.model_id, "block_size": runner.block_size,
                "layout": runner.layout.identity}

    async def abandon_kv(self, request_id: str) -> None:
        self.worker.abandon_kv(request_id)

    async def poll(self, resync: bool = False):
        return self.worker.load(), drain(self.worker.node.bus, self.worker.instance_id, resync)

    async def stats(self) -> dict:
        return self.worker.node.stats()
