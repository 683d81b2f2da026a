"""The cluster config as vLLM engine arguments (engine.kind: vllm).

From our config: the model folder (``model.path`` resolved as for the native engine, so
"smollm2" is the HF folder converted from the packaged GGUF), dtype, max model length,
block size, the KV cache (``engine.num_blocks`` blocks, sized exactly), the batch size,
prefix caching on, kvcluster's connector and vLLM's ZMQ KV events. Everything else
keeps vLLM's defaults.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from vllm.config import KVEventsConfig, KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs

from kvcluster.common.config import (
    VLLM_DATA_PARALLEL_MODES,
    VLLM_PARALLEL_SIZES,
    ClusterConfig,
    to_dict,
)
from kvcluster.common.layout import DTYPE_SIZES
from kvcluster.engine.hf_loader import load_arch
from kvcluster.engine.models import default_model_id, resolve_model
from kvcluster.integrations.vllm import CONNECTOR_CLASS, CONNECTOR_MODULE
from kvcluster.integrations.vllm.worker_extension import EXTENSION_CLASS

CPU_BLOCK_MULTIPLE = 32
"""vLLM-CPU's attention kernel pages in multiples of this many tokens (CPU_ATTN)."""


@dataclass(frozen=True)
class EventEndpoints:
    """Where the engine's KV events go (vLLM's ZmqEventPublisher).

    ``publish`` is the router's SUB address: a ``tcp://127.0.0.1:PORT`` endpoint makes
    vLLM's PUB *connect* to it (the subscriber binds). ``replay`` is bound by vLLM
    (a ROUTER answering "send me everything from seq N"). Both stay on loopback
    unless the config says otherwise.
    """

    publish: str
    replay: str = ""

    def __post_init__(self) -> None:
        for name in ("publish", "replay"):
            value = getattr(self, name)
            if value and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"KV event {name} endpoint {value!r} is not a ZMQ address")
        if "*" in self.publish:
            raise ValueError(f"publish endpoint {self.publish!r} would make vLLM bind every "
                             "interface; give the subscriber's own address")


def loopback_events(publish: str, host: str) -> EventEndpoints:
    """Events to ``publish``, the replay ROUTER on a port of ``host`` free now (vLLM
    binds it in its engine process, so it cannot report a port the OS picked; another
    bind may race this one)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return EventEndpoints(publish, f"tcp://{host}:{port}")


def model_folder(config: ClusterConfig) -> tuple[Path, str]:
    """The HF folder vLLM loads and the model id chunk keys are salted with."""
    folder = resolve_model(config.model.path)
    return folder, config.model.model_id or default_model_id(folder)


def engine_args(config: ClusterConfig, instance_id: str,
                events: EventEndpoints | None = None) -> AsyncEngineArgs:
    """vLLM's arguments for one worker instance of ``config``."""
    """Raises: ValueError for a block size the platform's attention cannot page, or an
    unknown ``engine.vllm_args`` name."""
    check_block_size(config.engine.block_size)
    folder, model_id = model_folder(config)
    arch = load_arch(folder)
    engine = config.engine
    args = AsyncEngineArgs(
        model=str(folder),
        served_model_name=[model_id],
        dtype=config.model.dtype,
        max_model_len=max_model_len(config, arch),
        block_size=engine.block_size,
        num_gpu_blocks_override=engine.num_blocks,
        kv_cache_memory_bytes=engine.num_blocks * kv_bytes_per_block(config, arch),
        max_num_seqs=engine.max_batch_size,
        enable_prefix_caching=True,
        kv_transfer_config=connector_config(config, instance_id, model_id),
        kv_events_config=events_config(events, instance_id) if events else None,
        worker_extension_cls=EXTENSION_CLASS,
    )
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(engine.vllm_args) - known)
    if unknown:
        raise ValueError(f"engine.vllm_args: {unknown} are not vLLM engine arguments")
    args = dataclasses.replace(args, **engine.vllm_args)
    check_one_worker(args)
    return args


def check_one_worker(args: AsyncEngineArgs) -> None:
    """One vLLM worker per engine, one engine per kvcluster instance (config validation
    refuses the same in ``engine.vllm_args``; this also catches vllm_args changed after
    the config was built, and vLLM's ``VLLM_DP_SIZE`` environment variable).

    Raises:
        ValueError: tensor, pipeline, context or data parallelism > 1, or a
            data-parallel load-balancing mode.
    """
    split = {name: getattr(args, name) for name in VLLM_PARALLEL_SIZES
             if getattr(args, name, None) not in (None, 1)}
    split.update({name: True for name in VLLM_DATA_PARALLEL_MODES if getattr(args, name, False)})
    if os.environ.get("VLLM_DP_SIZE", "1").strip() not in ("", "1"):
        split["VLLM_DP_SIZE (environment)"] = os.environ["VLLM_DP_SIZE"]
    if split:
        raise ValueError(f"vLLM engine arguments {split}: kvcluster runs one vLLM worker per "
                         "engine (its connector holds one worker's whole KV; the router "
                         "watches one KV event publisher per instance, and data-parallel "
                         "ranks publish on shifted ports); run more kvcluster instances "
                         "instead (workers.num_decode, workers.num_prefill)")


def max_model_len(config: ClusterConfig, arch) -> int:
    """engine.max_model_len, within what the model and the KV cache can hold: vLLM
    refuses to start when one request of that length does not fit its blocks (one of
    which it keeps as its null block)."""
    engine = config.engine
    fits_cache = (engine.num_blocks - 1) * engine.block_size
    if fits_cache <= 0:
        raise ValueError(f"engine.num_blocks {engine.num_blocks}: vLLM needs at least 2")
    return min(engine.max_model_len, arch.max_position_embeddings, fits_cache)


def check_block_size(block_size: int) -> None:
    """vLLM-CPU's attention pages in multiples of 32 tokens; say so before a minutes-long
    start-up fails on it."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and block_size % CPU_BLOCK_MULTIPLE:
        raise ValueError(f"engine.block_size {block_size}: vLLM on CPU needs a multiple of "
                         f"{CPU_BLOCK_MULTIPLE}")


def connector_config(config: ClusterConfig, instance_id: str, model_id: str
                     ) -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy="recompute",  # a chunk gone from the tiers: compute it
        kv_connector_extra_config={"cluster_config": to_dict(config),
                                   "instance_id": instance_id, "model_id": model_id},
    )


def events_config(events: EventEndpoints, instance_id: str) -> KVEventsConfig:
    """Topic = instance id: one bound SUB socket tells every engine's batches apart."""
    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                          endpoint=events.publish, replay_endpoint=events.replay or None,
                          topic=instance_id)


def kv_bytes_per_block(config: ClusterConfig, arch) -> int:
    """Bytes one vLLM block takes over all layers (K and V), in the KV dtype."""
    dtype_size = DTYPE_SIZES.get(config.model.dtype, 2)
    return (arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * dtype_size
            * config.engine.block_size)
