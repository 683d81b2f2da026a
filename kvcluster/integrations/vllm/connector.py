"""KVClusterConnector: kvcluster's tiers behind vLLM's prefix cache (KVConnectorBase_V1).

Loaded by vLLM from the engine's ``kv_transfer_config``::

    {"kv_connector": "KVClusterConnector",
     "kv_connector_module_path": "kvcluster.integrations.vllm.connector",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {"cluster_config": {...}, "instance_id": "d0",
                                   "model_id": "..."}}

vLLM builds one instance per role: the scheduler's (``scheduler_side.SchedulerSide``:
lookups and plans) and the worker's (``worker_side.WorkerSide``: the store and the
copies). Tier loads are synchronous (done before the step's forward) and saves happen
right after it, so a chunk is never read from blocks that can still change. One worker
only: tensor or pipeline parallelism would shard the KV across processes; one KV cache
group only (no hybrid models).

PD: a decode instance's stream from a prefill instance is an asynchronous load, as
vLLM's NIXL connector does it: ``get_num_new_matched_tokens`` answers ``(n, True)``,
the request waits in WAITING_FOR_REMOTE_KVS while its blocks fill, ``get_finished``
reports it in finished_recving, and blocks the stream did not fill come back from
``get_block_ids_with_load_errors`` (kv_load_failure_policy recompute: vLLM computes
them).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvcluster.integrations.vllm.metadata import (LOADED_TOKENS, LOST_TOKENS, RECV_WAIT_MS,
                                                  ConnectorMeta,
                                                  ConnectorSettings, KVClusterEvents)
from kvcluster.integrations.vllm.paged_kv import PagedShape
from kvcluster.integrations.vllm.scheduler_side import SchedulerSide
from kvcluster.integrations.vllm.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class KVClusterConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
            raise ValueError("KVClusterConnector supports one worker per engine "
                             "(tensor_parallel_size = pipeline_parallel_size = 1)")
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
        if len(groups) > 1:
            raise ValueError(f"KVClusterConnector supports one KV cache group; this model "
                             f"has {len(groups)} (a hybrid model: sliding-window or mamba "
                             f"layers beside full attention)")
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.settings = ConnectorSettings.from_extra_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._failed_blocks: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.settings, self.block_size)
        else:
            model = vllm_config.model_config
            shape = PagedShape(model.get_num_kv_heads(parallel), model.get_head_size(),
                               self.block_size)
            self._worker = WorkerSide(self.settings, shape, model.get_num_layers(parallel),
                                      _kv_dtype(vllm_config))

    # ------------------------------------------------------------ worker role

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ConnectorMeta)
        if meta.loads:
            self._failed_blocks |= self._worker_side().load(meta)
        if meta.recvs:
            self._worker_side().pd_expect(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv already filled every layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        return  # whole chunks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ConnectorMeta)
        if meta.sends:  # first: the decoder waits for these, the tiers do not
            self._worker_side().pd_send(meta)
        if meta.saves:
            self._worker_side().save(meta)

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        done, invalid = self._worker_side().pd_poll(finished_req_ids)
        self._failed_blocks |= invalid
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def get_kv_connector_kv_cache_events(self) -> KVClusterEvents | None:
        events = self._worker_side().take_events()
        return KVClusterEvents(events) if events else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # ------------------------------------------------------------ scheduler role

    def on_new_request(self, request: "Request") -> None:
        self._scheduler_side().on_new_request(request.request_id,
                                              list(request.prompt_token_ids or []),
                                              request.cache_salt,
                                              request.kv_transfer_params,
                                              request.all_token_ids)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        side = self._scheduler_side()
        if not side.knows(request.request_id):  # e.g. added before the connector was
            self.on_new_request(request)
        return side.num_new_matched_tokens(request.request_id, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int):
        self._scheduler_side().after_alloc(request.request_id, list(blocks.get_block_ids()[0]),
                                           num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self._scheduler_side().build_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self._scheduler_side().on_recv_outcome(set(connector_output.invalid_block_ids or ()),
                                               set(connector_output.finished_recving or ()))
        events = connector_output.kv_cache_events
        if isinstance(events, KVClusterEvents):
            self._scheduler_side().on_worker_events(events.get_all_events())

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        side = self._scheduler_side()
        lost = side.lost_tokens(request.request_id)
        waited_ms = side.recv_wait_ms(request.request_id)
        loaded = side.request_finished(request.request_id)
        params: dict[str, Any] = {LOADED_TOKENS: loaded} if loaded else {}
        if lost:  # vLLM's num_cached_tokens still counts them (its plan at admission)
            params[LOST_TOKENS] = lost
        if waited_ms:
            params[RECV_WAIT_MS] = waited_ms
        return False, (params or None)

    def take_events(self) -> Iterable:
        return self._scheduler_side().take_events()

    # ------------------------------------------------------------ helpers

    def _scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler hook called on the worker's connector"
        return self._scheduler

    def _worker_side(self) -> WorkerSide:
        assert self._worker is not None, "worker hook called on the scheduler's connector"
        return self._worker


def _kv_dtype(vllm_config: "VllmConfig") -> torch.dtype:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", None):
        raise ValueError(f"KVClusterConnector stores the model dtype's KV; "
                         f"kv_cache_dtype {cache_dtype!r} is not supported")
    return vllm_config.model_config.dtype
