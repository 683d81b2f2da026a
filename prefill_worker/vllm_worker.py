"""VLLMPrefillWorker: a prefill instance whose engine is vLLM v1 (engine.kind: vllm).

    PrefillTask -> vLLM computes the prompt (one sampled token, discarded), with
                   kv_transfer_params naming the decode instance (metadata.PD_SEND):
                   its prefix cache and kvcluster's connector serve what they hold,
                   the connector stores every whole chunk in this instance's tiers and,
                   in vLLM's worker process, streams the whole chunks (all but the last
                   token's) to the decode instance as each step computes them
                   (pd_sender: KVSender, adaptive level per chunk, text fallback,
                   checksums)
                -> the stream's outcome, read back from the worker process, fills the
                   PrefillResult

The decode instance computes the tail itself; a failed transfer only costs it the
recompute (the PrefillResult says so).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from kvcluster.common.config import ClusterConfig
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import PrefillResult, PrefillTask
from kvcluster.integrations.vllm.engine import VLLMEngine
from kvcluster.integrations.vllm.engine_args import EventEndpoints, loopback_events, model_folder
from kvcluster.integrations.vllm.metadata import PD_SEND
from kvcluster.observability.metrics import advertised_zmq
from prefill_worker.base import PrefillWorkerBase
from router.load import InstanceLoad

log = logging.getLogger(__name__)

ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)
SEND_POLL_S = 0.005
"""How often the stream's outcome is asked for once vLLM computed the prompt."""


class VLLMPrefillWorker(PrefillWorkerBase):
    def __init__(self, config: ClusterConfig, instance_id: str):
        super().__init__(config, instance_id)
        self.folder, self.model_id = model_folder(config)
        self.engine: VLLMEngine | None = None
        self.events: EventEndpoints | None = None
        self._ids = itertools.count()
        self._planes: dict[str, int] = {}
        """Streams per data plane (what the worker process's sender used)."""

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

    def data_plane_stats(self) -> dict:
        """Streams per data plane, as the worker process's sender used them."""
        return {"data_plane": self.config.transfer.data_plane, "transfers": dict(self._planes)}

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------ helpers

    async def _prefill(self, task: PrefillTask) -> PrefillResult:
        """Compute ``task``'s prompt in vLLM, which streams its whole chunks on."""
        engine = self._engine()
        began = time.perf_counter()
        # the chunks the decoder can use: vLLM computes at least the last prompt token
        chunk_tokens = self.config.store.chunk_tokens
        num_tokens = (len(task.token_ids) - 1) // chunk_tokens * chunk_tokens
        send = None
        if task.decode_target and num_tokens:
            send = {PD_SEND: {"transfer_id": task.request_id, "target": task.decode_target,
                              "num_tokens": num_tokens, "slo_ms": task.slo_ms or 0.0}}
        final = None
        async for step in engine.generate(f"{task.request_id}#p{next(self._ids)}",
                                          task.token_ids, ONE_TOKEN, task.tenant, send):
            final = step if step.finished else final
        prefill_s = time.perf_counter() - began
        self.metrics.prefill_seconds.observe(prefill_s)
        cached = final.num_cached_tokens if final else 0
        by_tier = dict(final.loaded_tokens_by_tier) if final else {}
        if cached > sum(by_tier.values()):
            by_tier["prefix_cache"] = cached - sum(by_tier.values())
        result = PrefillResult(task.request_id, len(task.token_ids),
                               num_tokens if send else 0, cached_tokens_by_tier=by_tier,
                               num_computed_tokens=len(task.token_ids) - cached,
                               prefill_s=prefill_s)
        if send is not None:
            await self._fill_send(task, result, began)
        log.info("prefill done (vLLM): prompt=%d cached=%d sent=%d tokens, %d B in "
                 "%.3f+%.3f s", result.num_prompt_tokens, cached,
                 result.num_transferred_tokens, result.wire_bytes, result.prefill_s,
                 result.transfer_s)
        return result

    async def _fill_send(self, task: PrefillTask, result: PrefillResult, began: float
                         ) -> None:
        """Wait for the stream's outcome (it began with vLLM's first step) and put it
        into ``result``; none within the transfer timeout counts as failed."""
        engine = self._engine()
        deadline = time.monotonic() + self.config.transfer.timeout_s
        sent = await engine.pd_send_result(task.request_id)
        while sent is None and time.monotonic() < deadline:
            await asyncio.sleep(SEND_POLL_S)
            sent = await engine.pd_send_result(task.request_id)
        sent = sent or {"ok": False, "message": "no stream outcome within "
                        f"{self.config.transfer.timeout_s:g} s", "bytes_sent": 0,
                        "levels": [], "data_plane": ""}
        # the stream ran beside the prefill: what it added is the wait past the prompt
        result.transfer_s = max(0.0, time.perf_counter() - began - result.prefill_s)
        self._record_transfer(task, result, await engine.layout(), bool(sent["ok"]),
                              str(sent["message"]), int(sent["bytes_sent"]), sent["levels"],
                              str(sent["data_plane"]))
        if result.data_plane:
            self._planes[result.data_plane] = self._planes.get(result.data_plane, 0) + 1
        self.transfer_metrics.observe_send(result.transfer_ok, float(sent.get("elapsed_s", 0)),
                                           [tuple(c) for c in sent.get("chunk_bytes", ())])

    def _engine(self) -> VLLMEngine:
        if self.engine is None:
            raise RuntimeError(f"prefill worker {self.instance_id}: start() first")
        return self.engine
