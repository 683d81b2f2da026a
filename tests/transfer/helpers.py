"""A receiver (tiny engine + paged sink) on 127.0.0.1 and a sender, for one test."""

from __future__ import annotations

import contextlib

from decode_worker.paged_sink import PagedCacheSink
from kvcluster.engine.sequence import Sequence
from kvcluster.transfer.receiver import KVReceiver
from kvcluster.transfer.security import ServerSecurity
from kvcluster.transfer.server import TransferServer
from kvcluster.transfer.sink import RecomputeSpeed


class ReceiverNode:
    """The decode side: a runner, a receiver writing into its paged cache, a gRPC server."""

    def __init__(self, runner, levels, config, security: ServerSecurity | None = None,
                 prefill_tokens_per_s: float = 0.0):
        self.runner = runner
        self.sinks: dict[str, PagedCacheSink] = {}
        self.speed = RecomputeSpeed(prefill_tokens_per_s)
        self.receiver = KVReceiver(runner.layout, levels, self._open_sink, config, self.speed)
        self.server = TransferServer(self.receiver, config, security)

    def _open_sink(self, header) -> PagedCacheSink:
        seq = Sequence(header.request_id, list(header.token_ids))
        sink = PagedCacheSink(self.runner, seq, self.speed)
        self.sinks[header.request_id] = sink
        return sink

    def kv(self, request_id: str):
        seq = self.sinks[request_id].seq
        block_size = self.runner.block_size
        kv = self.runner.cache.export_blocks(seq.block_table[:-(-seq.num_tokens // block_size)])
        return kv[:, :, :seq.num_tokens]

    def free(self, request_id: str) -> None:
        self.runner.free(self.sinks.pop(request_id).seq)


@contextlib.asynccontextmanager
async def receiver_node(runner, levels, config, data_planes=None, **kwargs):
    """A started :class:`ReceiverNode`; ``data_planes`` replaces its server's planes."""
    node = ReceiverNode(runner, levels, config, **kwargs)
    if data_planes is not None:
        node.server.data_planes = data_planes
    await node.server.start()
    try:
        yield node
    finally:
        await node.server.stop(0)
        node.receiver.close()
