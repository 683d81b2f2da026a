"""VLLMPrefillWorker: a prefill instance whose engine is vLLM v1 (engine.kind: vllm).

    PrefillTask -> vLLM computes the prompt (one sampled token, discarded): its prefix
                   cache and kvcluster's connector serve what they hold, the connector
                   stores every whole chunk in this instance's tiers
                -> the whole chunks (all but the last token's) read back from the tiers
                   in vLLM's worker process (worker_extension.kvcluster_get_chunks)
                -> kvcluster's transfer to the decode instance (KVSender: adaptive
                   level per chunk, text fallback, checksums)

The decode instance computes the tail itself; a failed transfer only costs it the
recompute (the PrefillResult says so).
"""

from __future__ import annotations

import itertools
import logging
import time

from kvcluster.common.config import ClusterConfig
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.integrations.vllm.engine import VLLMEngine
from kvcluster.integrations.vllm.engine_args import EventEndpoints, loopback_events, model_folder
from kvcluster.observability.metrics import advertised_zmq
from kvcluster.transfer.source import ChunkSource
from prefill_worker.base import PrefillWorkerBase
from router.load import InstanceLoad

log = logging.getLogger(__name__)

ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)


class VLLMPrefillWorker(PrefillWorkerBase):
    def __init__(self, config: ClusterConfig, instance_id: str):
        super().__init__(config, instance_id)
        self.folder, self.model_id = model_folder(config)
        self.engine: VLLMEngine | None = None
        self.events: EventEndpoints | None = None
        self._ids = itertools.count()

    async def start(self, kv_events_publish: str = "") -> None:
        """Start vLLM (once); with ``kv_events_publish`` its KV events go there and its
        replay socket is bound on ``transfer.host`` (``info()["kv_events_replay"]``)."""
        if self.engine is None:
            if kv_events_publish:
                self.events = loopback_events(kv_events_publish, self.config.transfer.host)
            self.engine = VLLMEngine(self.config, self.instance_id, self.events)

    def load(self) -> InstanceLoad:
        return InstanceLoad(self._queued_tokens, 0, 0, 0)

    def info(self) -> dict:
        return {"model_id": self.model_id, "block_size": self.config.engine.block_size,
                "layout": "", "engine": "vllm",
                "kv_events_replay": advertised_zmq(self.events.replay) if self.events else ""}

    def registries(self) -> list:
        return [self.metrics.registry, self.transfer_metrics.registry]

    def take_event_batches(self, resync: bool) -> list:
        return []  # vLLM publishes its KV events over ZMQ itself (EventEndpoints)

    async def stats(self) -> dict:
        return {"instance_id": self.instance_id, "engine": "vllm",
                **await self._engine().tier_stats(), "lookup_chunks": 0,
                "data_plane": self.data_plane_stats()}

    async def close(self) -> None:
        await self._close_senders()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------ helpers

    async def _prefill(self, task: PrefillTask) -> PrefillResult:
        """Compute ``task``'s prompt in vLLM and send its whole chunks on."""
        engine = self._engine()
        began = time.perf_counter()
        final = None
        async for step in engine.generate(f"{task.request_id}#p{next(self._ids)}",
                                          task.token_ids, ONE_TOKEN, task.tenant):
            final = step if step.finished else final
        prefill_s = time.perf_counter() - began
        self.metrics.prefill_seconds.observe(prefill_s)
        # the chunks the decoder can use: vLLM computes at least the last prompt token
        chunk_tokens = self.config.store.chunk_tokens
        num_chunks = (len(task.token_ids) - 1) // chunk_tokens
        keys = chunk_hashes(task.token_ids[: num_chunks * chunk_tokens],
                            self.config.engine.block_size, chunk_tokens,
                            ExtraKeys(self.model_id, task.tenant))
        kv = await engine.get_chunks(keys) if keys else None  # [L, 2, n * C, H, D]
        num_tokens = 0 if kv is None else kv.shape[2]
        cached = final.num_cached_tokens if final else 0
        by_tier = dict(final.loaded_tokens_by_tier) if final else {}
        if cached > sum(by_tier.values()):
            by_tier["prefix_cache"] = cached - sum(by_tier.values())
        result = PrefillResult(task.request_id, len(task.token_ids), num_tokens,
                               cached_tokens_by_tier=by_tier,
                               num_computed_tokens=len(task.token_ids) - cached,
                               prefill_s=prefill_s)
        if task.decode_target and kv is not None:
            layout = await engine.layout()
            source = ChunkSource(task.token_ids[:num_tokens], layout, self.levels,
                                 self.config.transfer.chunk_tokens, kv=kv)
            await self._send(task, source, layout, result)
        log.info("prefill done (vLLM): prompt=%d cached=%d sent=%d tokens, %d B in "
                 "%.3f+%.3f s", result.num_prompt_tokens, cached, num_tokens,
                 result.wire_bytes, result.prefill_s, result.transfer_s)
        return result

    def _engine(self) -> VLLMEngine:
        if self.engine is None:
            raise RuntimeError(f"prefill worker {self.instance_id}: start() first")
        return self.engine
