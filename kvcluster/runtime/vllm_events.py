"""The router's view of vLLM engines (engine.kind: vllm), built before the pools start.

    VLLMEventSubscriber (router.vllm_subscriber): one ZMQ SUB bound on router.host
      <- every vLLM engine's PUB connects (EventEndpoints.publish, topic = instance id)
      -> re-hashed into kvcluster's chunk keys -> the decode router's EventBus
    each decode worker binds its replay ROUTER; the backend calls watch(id, replay)

The subscriber's address must exist before any engine starts (vLLM fixes its
publisher endpoint at start-up), so the hash settings come from the config here, not
from the workers' ``info()``; :func:`check_workers_hash_like` compares them after.
"""

from __future__ import annotations

import logging

from kvcluster.common.config import ClusterConfig
from kvcluster.common.events import HashSettings
from kvcluster.engine.models import default_model_id, resolve_model
from kvcluster.worker.node import hash_settings
from router.event_bus import EventBus

log = logging.getLogger(__name__)


def configured_hash_settings(config: ClusterConfig) -> HashSettings:
    """What vLLM workers of ``config`` hash with (their connector's model id and chunks)."""
    model_id = config.model.model_id or default_model_id(resolve_model(config.model.path))
    return hash_settings(model_id, config.engine.block_size, config.store.chunk_tokens)


def start_subscriber(bus: EventBus, settings: HashSettings, host: str):
    """The subscriber bound on ``host`` (a free port), or None when this checkout has no
    router.vllm_subscriber (the router then routes on load alone, and says so)."""
    try:
        from router.vllm_subscriber import VLLMEventSubscriber
    except ImportError:
        log.error("router.vllm_subscriber is missing: the router gets no KV events from "
                  "the vLLM engines and routes on load alone")
        return None
    return VLLMEventSubscriber(bus, settings, bind=f"tcp://{host}:0")


def check_workers_hash_like(settings: HashSettings, infos: list[dict]) -> None:
    """Raises: ValueError when a worker salts or chunks its keys otherwise than the
    subscriber re-hashes (its events would all mismatch)."""
    for info in infos:
        if (info["model_id"], info["block_size"]) != (settings.model_id, settings.block_size):
            raise ValueError(f"a vLLM worker hashes with model {info['model_id']!r}, block "
                             f"{info['block_size']}; the router with {settings.model_id!r}, "
                             f"{settings.block_size}")
