"""VLLMEngine: one vLLM v1 engine (AsyncLLM) for a kvcluster worker instance.

    VLLMEngine(config, "d0", events).generate(request_id, token_ids, params, tenant)
        -> EngineStep(new token ids), ..., EngineStep(finished, reason, cached tokens)

AsyncLLM runs vLLM's engine core (scheduler + KV connector's scheduler half) in a child
process and the model worker (paged KV + the connector's worker half) in another; this
object lives on the caller's event loop and only passes token ids. The tenant becomes
vLLM's ``cache_salt``: vLLM's own prefix cache and kvcluster's chunk keys are then both
salted with it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from vllm import SamplingParams as VLLMSamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from kvcluster.common.config import ClusterConfig
from kvcluster.common.layout import KVLayout
from kvcluster.common.sampling import SamplingParams
from kvcluster.integrations.vllm.engine_args import EventEndpoints, engine_args, model_folder
from kvcluster.integrations.vllm.kv_usage import KVUsage
from kvcluster.integrations.vllm.metadata import LOADED_TOKENS, LOST_TOKENS, RECV_WAIT_MS

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass(frozen=True)
class EngineStep:
    token_ids: tuple[int, ...] = ()
    """Tokens sampled since the previous step."""
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    """Final step: prompt tokens vLLM did not compute (its prefix cache + the tiers)."""
    loaded_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    """Final step: of those, what the connector loaded from each kvstore tier."""
    kv_wait_ms: float = 0.0
    """Final step: how long vLLM held the request waiting for its KV stream (PD)."""


class VLLMEngine:
    def __init__(self, config: ClusterConfig, instance_id: str,
                 events: EventEndpoints | None = None):
        self.config = config
        self.instance_id = instance_id
        self.folder, self.model_id = model_folder(config)
        _threads_for_vllm()
        args = engine_args(config, instance_id, events)
        self.kv_bytes_per_token = args.kv_cache_memory_bytes // (
            config.engine.num_blocks * config.engine.block_size)
        self.kv_usage = KVUsage()
        """vLLM's KV cache usage, as its scheduler last reported it."""
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self.kv_usage.factory()])
        self.block_size = config.engine.block_size
        self._layout: KVLayout | None = None

    async def generate(self, request_id: str, token_ids: Sequence[int],
                       params: SamplingParams, tenant: str = "",
                       kv_transfer_params: dict | None = None) -> AsyncIterator[EngineStep]:
        """Steps of one request; closing or cancelling the iterator before its final
        step aborts the request in vLLM (its blocks are freed now, not at GC).

        ``kv_transfer_params``: the connector's PD instructions (metadata.PD_RECV on a
        decode instance, PD_SEND on a prefill one).

        Raises:
            vLLM's errors as they are (:func:`kvcluster.integrations.vllm.errors.
            as_kvcluster_error` gives them our codes).
        """
        prompt = TokensPrompt(prompt_token_ids=list(token_ids))
        if tenant:
            prompt["cache_salt"] = tenant
        sampling = vllm_sampling(params)
        if kv_transfer_params:
            sampling.extra_args = {"kv_transfer_params": dict(kv_transfer_params)}
        outputs = self.llm.generate(prompt, sampling, request_id)
        finished = False
        try:
            async for out in outputs:
                completion = out.outputs[0]
                if not out.finished:
                    yield EngineStep(tuple(completion.token_ids))
                    continue
                finished = True
                params = out.kv_transfer_params or {}
                loaded = params.get(LOADED_TOKENS, {})
                # vLLM counts a planned load as cached even where it failed and was computed
                cached = max(0, (out.num_cached_tokens or 0) - int(params.get(LOST_TOKENS, 0)))
                yield EngineStep(tuple(completion.token_ids), True,
                                 FINISH_REASONS.get(completion.finish_reason or "", "stop"),
                                 cached, dict(loaded),
                                 float(params.get(RECV_WAIT_MS, 0.0)))
        finally:
            if not finished:  # AsyncLLM.generate aborts the request when closed early
                await outputs.aclose()

    async def layout(self) -> KVLayout:
        """The layout of the KV this engine's store holds (and the transfer carries)."""
        if self._layout is None:
            (fields,) = await self.llm.collective_rpc("kvcluster_layout")
            self._layout = KVLayout(**fields)
        return self._layout

    async def pd_address(self) -> str:
        """``host:port`` of the KV receiver in vLLM's worker process (started now)."""
        (address,) = await self.llm.collective_rpc("kvcluster_pd_address")
        return address

    async def pd_abandon(self, transfer_id: str) -> None:
        """Nobody will stream ``transfer_id``: its request stops waiting for it."""
        await self.llm.collective_rpc("kvcluster_pd_abandon", args=(transfer_id,))

    async def pd_send_result(self, transfer_id: str) -> dict | None:
        """The outcome of the stream the worker sent for ``transfer_id`` (None: not
        ended yet); see pd_sender.PDSender.take_result."""
        (result,) = await self.llm.collective_rpc("kvcluster_pd_send_result",
                                                  args=(transfer_id,))
        return result

    async def pd_receiver_stats(self) -> dict:
        (stats,) = await self.llm.collective_rpc("kvcluster_pd_receiver_stats")
        return stats

    async def tier_stats(self) -> dict:
        """``{"tiers": {name: {used_bytes, capacity_bytes, hits, up}}, "misses": n}`` of
        the connector's store in vLLM's worker process."""
        (stats,) = await self.llm.collective_rpc("kvcluster_tier_stats")
        return stats

    def num_unfinished(self) -> int:
        """Requests vLLM still holds (waiting or running)."""
        return self.llm.output_processor.get_num_unfinished_requests()

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def shutdown(self) -> None:
        self.llm.shutdown()


def vllm_sampling(params: SamplingParams) -> VLLMSamplingParams:
    """Our sampling parameters as vLLM's (token ids only: no detokenizing)."""
    return VLLMSamplingParams(
        max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        detokenize=False, output_kind=RequestOutputKind.DELTA)


def _threads_for_vllm() -> None:
    """vLLM's processes inherit this one's environment: a Ray actor's OMP_NUM_THREADS is
    1 (its CPU share), which would run vLLM's forward on one core. vLLM sizes its own
    thread pool from every core it may run on, as engine.native_threads 0 does."""
    if os.environ.get("OMP_NUM_THREADS") == "1" and _in_ray_actor():
        os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
