"""VLLMDecodeWorker: a decode instance whose engine is vLLM v1 (engine.kind: vllm).

    DecodeTask (Ray) -> VLLMEngine.generate(token ids, tenant as cache_salt)
                        vLLM's scheduler + kvcluster's connector: its own prefix cache,
                        then the kvstore tiers (host, disk, Redis), then compute
                     -> one DecodeStep per token, then the final step with cached tokens
                        by source (the connector's tier loads, vLLM's prefix cache)

Disaggregated, a task that expects KV goes to vLLM at once, with kv_transfer_params
naming the stream (metadata.PD_RECV): vLLM allocates its blocks and waits while the
prefill instance computes and streams straight into them (the connector's receiver in
vLLM's worker process, whose address this worker advertises). No stream in time, the
sender gone (abandon_kv), a bad or cut stream: vLLM computes what did not arrive.

vLLM keeps its KV, its batch and its store (the connector's worker half) in its own
processes; this object only passes token ids and keeps the request bookkeeping the
backends rely on (bounded admission, error codes, stage timings). Closing a request's
iterator aborts it in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from decode_worker.base import DecodeWorkerBase
from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import KVClusterError, OverloadedError
from kvcluster.common.tasks import DecodeStep, DecodeTask
from kvcluster.integrations.vllm.engine import EngineStep, VLLMEngine
from kvcluster.integrations.vllm.engine_args import EventEndpoints, loopback_events, model_folder
from kvcluster.integrations.vllm.errors import as_kvcluster_error
from kvcluster.integrations.vllm.metadata import PD_RECV
from kvcluster.observability.logs import request_context
from kvcluster.observability.metrics import WorkerMetrics, advertised_zmq
from router.load import InstanceLoad

log = logging.getLogger(__name__)


@dataclass
class _Active:
    arrived_s: float
    submitted_s: float = 0.0
    """When the request went to vLLM (with a KV stream: before it arrives)."""
    first_token_s: float = 0.0
    first_token_time: float = 0.0
    num_tokens: int = 0
    stage_ms: dict[str, float] = field(default_factory=dict)


class VLLMDecodeWorker(DecodeWorkerBase):
    def __init__(self, config: ClusterConfig, instance_id: str):
        """The engine starts in :meth:`start` (minutes with torch.compile), on the
        caller's event loop: vLLM's client sockets belong to the loop that made them."""
        if config.engine.kind != "vllm":
            raise ValueError(f"VLLMDecodeWorker needs engine.kind vllm, not "
                             f"{config.engine.kind!r}")
        self.config = config
        self.instance_id = instance_id
        self.folder, self.model_id = model_folder(config)
        self.engine: VLLMEngine | None = None
        self.events: EventEndpoints | None = None
        self.address = ""
        """Disaggregated: the KV receiver in vLLM's worker process, for prefill pools."""
        self._abandons: set[asyncio.Task] = set()
        self.metrics = WorkerMetrics(instance_id, "decode")
        self._active: dict[str, _Active] = {}
        self._ids = itertools.count()
        self.metrics.watch_queue(lambda: 0, lambda: len(self._active))

    async def start(self, kv_events_publish: str = "") -> str:
        """Start vLLM (once). With ``kv_events_publish``, vLLM's KV events (its own
        blocks and the connector's tier events) go there, topic = instance id, and vLLM
        binds its replay socket on ``transfer.host`` (:attr:`info`'s
        ``kv_events_replay``)."""
        if self.engine is None:
            if kv_events_publish:
                self.events = loopback_events(kv_events_publish, self.config.transfer.host)
            self.engine = VLLMEngine(self.config, self.instance_id, self.events)
            if not self.config.workers.colocated:  # a prefill pool streams KV here
                self.address = await self.engine.pd_address()
        return self.address

    async def generate(self, task: DecodeTask) -> AsyncIterator[DecodeStep]:
        engine = self._engine()
        if len(self._active) >= self.config.workers.max_queue:
            self.metrics.count("overloaded")
            raise OverloadedError(f"decode worker {self.instance_id} has "
                                  f"{len(self._active)} active requests")
        engine_id = f"{task.request_id}#{next(self._ids)}"  # unique even if ids repeat
        active = self._active[engine_id] = _Active(time.perf_counter())
        try:
            active.submitted_s = time.perf_counter()
            steps = engine.generate(engine_id, task.token_ids, task.params, task.tenant,
                                    self._recv_params(task))
            async with contextlib.aclosing(steps):
                async for step in self._checked(steps, active):
                    for token_id in step.token_ids:
                        yield DecodeStep(token_id)
                    if step.finished:
                        with request_context(task.request_id):
                            self._observe_done(active)
                        yield self._final(step, active, task.expect_kv)
                        return
        except KVClusterError:
            self.metrics.count("error")
            raise
        finally:
            self._active.pop(engine_id, None)

    def abandon_kv(self, request_id: str) -> None:
        """The request's prefill failed: its vLLM request stops waiting for the stream
        (told between two of vLLM's steps, off this call)."""
        if self.engine is None or not self.address:
            return
        task = asyncio.get_running_loop().create_task(self.engine.pd_abandon(request_id))
        self._abandons.add(task)
        task.add_done_callback(self._abandons.discard)

    def load(self) -> InstanceLoad:
        capacity = self._kv_capacity_bytes()
        used = int(capacity * self.engine.kv_usage.fraction) if self.engine else 0
        return InstanceLoad(0, len(self._active), used, capacity)

    def info(self) -> dict:
        return {"model_id": self.model_id, "block_size": self.config.engine.block_size,
                "layout": "", "engine": "vllm",
                "kv_events_replay": advertised_zmq(self.events.replay) if self.events else ""}

    def registries(self) -> list:
        return [self.metrics.registry]

    def take_event_batches(self, resync: bool) -> list:
        return []  # vLLM publishes its KV events over ZMQ itself (EventEndpoints)

    async def stats(self) -> dict:
        """The connector's tiers (in vLLM's worker process), and the requests vLLM still
        holds (``engine_requests``: an aborted one leaves)."""
        engine = self._engine()
        receiver = await engine.pd_receiver_stats() if self.address else {}
        return {"instance_id": self.instance_id, "engine": "vllm",
                **await engine.tier_stats(),
                "active_requests": len(self._active),
                "engine_requests": engine.num_unfinished(),
                "lookup_chunks": 0,
                "data_plane": receiver.pop("data_plane", {}), "kv_receiver": receiver}

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------ helpers

    def _engine(self) -> VLLMEngine:
        if self.engine is None:
            raise RuntimeError(f"decode worker {self.instance_id}: start() first")
        return self.engine

    async def _checked(self, steps: AsyncIterator[EngineStep], active: _Active
                       ) -> AsyncIterator[EngineStep]:
        """vLLM's steps, its errors with our codes (a prompt too long or a token id past
        the vocabulary: INVALID_ARGUMENT; a dead engine: UNAVAILABLE)."""
        while True:
            try:
                step = await anext(steps)
            except StopAsyncIteration:
                return
            except Exception as exc:
                error = as_kvcluster_error(exc)
                if error is None:
                    raise
                raise error from None
            if step.token_ids and not active.first_token_s:
                active.first_token_s = time.perf_counter() - active.arrived_s
                active.first_token_time = time.time()
                # vLLM queues and prefills in its own process: one stage, submit to token
                active.stage_ms["first_decode_step"] = (
                    time.perf_counter() - active.submitted_s) * 1e3
            active.num_tokens += len(step.token_ids)
            yield step

    def _recv_params(self, task: DecodeTask) -> dict | None:
        """The stream vLLM waits for: the prompt's whole chunks but the last token's
        (what the prefill instance sends), within the task's KV timeout."""
        if not task.expect_kv or not self.address:
            return None
        chunk_tokens = self.config.store.chunk_tokens
        num_tokens = (len(task.token_ids) - 1) // chunk_tokens * chunk_tokens
        if not num_tokens:
            return None
        return {PD_RECV: {"transfer_id": task.request_id, "num_tokens": num_tokens,
                          "timeout_s": task.kv_timeout_s}}

    def _final(self, step: EngineStep, active: _Active, expected_kv: bool) -> DecodeStep:
        if step.kv_wait_ms:  # inside vLLM: blocks allocated until the stream was in
            active.stage_ms["kv_transfer"] = step.kv_wait_ms
        by_tier = {tier: n for tier, n in step.loaded_tokens_by_tier.items() if n}
        engine_cached = step.num_cached_tokens - sum(by_tier.values())
        if engine_cached > 0:
            by_tier["prefix_cache"] = engine_cached
        kv_source = ("transfer" if by_tier.get("transfer") else
                     "local-store" if by_tier.keys() - {"prefix_cache"} else
                     "prefix-cache" if engine_cached > 0 else
                     "recompute" if expected_kv else "none")
        return DecodeStep(finish_reason=step.finish_reason,
                          num_cached_tokens=step.num_cached_tokens, kv_source=kv_source,
                          first_token_s=active.first_token_s,
                          first_token_time=active.first_token_time,
                          cached_tokens_by_tier=by_tier, stage_ms=dict(active.stage_ms))

    def _observe_done(self, active: _Active) -> None:
        elapsed_s = time.perf_counter() - active.arrived_s
        self.metrics.count("ok")
        self.metrics.decode_seconds.observe(elapsed_s)
        self.metrics.decode_first_token.observe(active.first_token_s)
        log.info("decode done (vLLM): tokens=%d first token %.3f s, total %.3f s",
                 active.num_tokens, active.first_token_s, elapsed_s)

    def _kv_capacity_bytes(self) -> int:
        """The KV cache vLLM was given (engine.num_blocks blocks), as the router's
        load denominator; vLLM's own usage stays in its process."""
        if self.engine is None:
            return 0
        per_token = self.engine.kv_bytes_per_token
        return self.config.engine.num_blocks * self.config.engine.block_size * per_token

