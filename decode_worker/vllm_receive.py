"""The KV a prefill instance streams to a vLLM decode instance, into vLLM's host tier.

    prefill instance --kvcluster transfer (gRPC control, data plane)--> TransferServer
      -> KVReceiver -> ReceivedChunksSink (host memory, this actor)
      -> VLLMEngine.put_chunks: vLLM's worker process stores the whole chunks under the
         request's chunk keys -> the request is added with kvcluster_received_chunks,
         and the connector loads them into its paged blocks when vLLM schedules it

Anything wrong (no stream in time, the sender gone, a failed or mismatched stream):
no chunks, and vLLM computes the prompt (no wrong tokens, no hang).
"""

from __future__ import annotations

import logging

from decode_worker.received_sink import ReceivedChunksSink
from kvcluster.common.config import ClusterConfig
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from kvcluster.common.tasks import DecodeTask
from kvcluster.integrations.vllm.engine import VLLMEngine
from kvcluster.transfer.messages import StreamHeader
from kvcluster.transfer.receiver import KVReceiver
from kvcluster.transfer.security import ServerSecurity
from kvcluster.transfer.server import TransferServer
from kvcluster.transfer.sink import RecomputeSpeed
from kvcluster.worker.kv_wait import KVWaits
from kvstore.codec.factory import level_set

log = logging.getLogger(__name__)


class VLLMKVReceiver:
    def __init__(self, config: ClusterConfig, engine: VLLMEngine, model_id: str):
        self.config = config
        self.engine = engine
        self.model_id = model_id
        self.receiver: KVReceiver | None = None
        self.server: TransferServer | None = None
        self._kv_waits = KVWaits()

    async def start(self) -> str:
        """Bind the KV receiver on ``transfer.host``; returns its ``host:port``."""
        layout = await self.engine.layout()
        self.receiver = KVReceiver(layout, level_set(config=self.config.codec),
                                   self._open_sink, self.config.transfer, RecomputeSpeed())
        self.server = TransferServer(self.receiver, self.config.transfer,
                                     ServerSecurity.internal(self.config.security))
        await self.server.start()
        return self.server.address

    async def receive(self, task: DecodeTask) -> int:
        """Wait for ``task``'s stream and put its whole chunks into vLLM's host tier.

        Returns:
            How many of the prompt's first store chunks are there now (0: vLLM computes).
        """
        sink = await self._wait(task)
        if sink is None:
            return 0
        chunk_tokens = self.config.store.chunk_tokens
        num_chunks = sink.decoded_prefix_tokens() // chunk_tokens
        if not num_chunks:
            return 0
        keys = chunk_hashes(task.token_ids[: num_chunks * chunk_tokens],
                            self.config.engine.block_size, chunk_tokens,
                            ExtraKeys(self.model_id, task.tenant))
        kv = sink.kv[:, :, : num_chunks * chunk_tokens]  # [L, 2, n * C, H, D]
        try:
            await self.engine.put_chunks(keys, kv, task.tenant)
        except Exception:  # noqa: BLE001 - the request still runs, computing its prompt
            log.exception("request %s: received KV not stored in vLLM's tiers; computing",
                          task.request_id)
            return 0
        finally:
            sink.discard()
        return num_chunks

    def abandon(self, request_id: str) -> None:
        """The sender is gone before streaming (its prefill failed): stop waiting."""
        self._kv_waits.abandon(request_id)

    def data_plane_stats(self) -> dict:
        return self.receiver.data_plane_stats() if self.receiver else {}

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        if self.receiver is not None:
            self.receiver.close()

    # ------------------------------------------------------------ helpers

    async def _wait(self, task: DecodeTask) -> ReceivedChunksSink | None:
        assert self.receiver is not None, "start() first"
        result, why = await self._kv_waits.wait(self.receiver, task.request_id,
                                                task.kv_timeout_s)
        if result is None:
            log.warning("request %s: no KV (%s); vLLM computes the prompt",
                        task.request_id, why)
            return None
        sink: ReceivedChunksSink = result.sink
        if not result.status.ok or sink.token_ids != list(task.token_ids[:len(sink.token_ids)]):
            log.warning("request %s: KV stream unusable (%s); vLLM computes the prompt",
                        task.request_id, result.status.message)
            sink.discard()
            return None
        return sink

    def _open_sink(self, header: StreamHeader) -> ReceivedChunksSink:
        assert self.receiver is not None
        return ReceivedChunksSink(self.receiver.layout, header.token_ids)
