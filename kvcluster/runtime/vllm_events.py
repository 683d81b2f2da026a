"""The router's view of vLLM engines (engine.kind: vllm), built before the pools start.

    VLLMEventSubscriber (router.vllm_subscriber): one ZMQ SUB per pool
      (router.vllm_events_bind for decode; the prefill pool's on a free port)
      <- every vLLM engine's PUB connects (EventEndpoints.publish, topic = instance id)
      -> re-hashed into kvcluster's chunk keys -> that pool's router's EventBus
    each worker binds its replay ROUTER; the backend calls watch(id, replay)

The subscriber's address must exist before any engine starts (vLLM fixes its
publisher endpoint at start-up), so the hash settings come from the config here, not
from the workers' ``info()``; :func:`check_workers_hash_like` compares them after.
"""

from __future__ import annotations

import dataclasses
import logging

from kvcluster.common.config import ClusterConfig, RouterConfig
from kvcluster.common.events import HashSettings
from kvcluster.engine.models import default_model_id, resolve_model
from kvcluster.worker.node import hash_settings
from router.event_bus import EventBus

log = logging.getLogger(__name__)


def configured_hash_settings(config: ClusterConfig) -> HashSettings:
    """What vLLM workers of ``config`` hash with (their connector's model id and chunks)."""
    model_id = config.model.model_id or default_model_id(resolve_model(config.model.path))
    return hash_settings(model_id, config.engine.block_size, config.store.chunk_tokens)


def start_subscriber(bus: EventBus, settings: HashSettings, router: RouterConfig,
                     role: str):
    """``role``'s pool subscriber, bound to ``router.vllm_events_bind`` (the decode
    pool's; the prefill pool's on the same host, a free port), or None when this
    checkout has no router.vllm_subscriber (the router then routes on load alone)."""
    try:
        from router.vllm_subscriber import VLLMEventSubscriber
    except ImportError:
        log.error("router.vllm_subscriber is missing: the router gets no KV events from "
                  "the vLLM engines and routes on load alone")
        return None
    if role != "decode":
        router = dataclasses.replace(router, vllm_events_bind=_free_port_of(
            router.vllm_events_bind, role))
    return VLLMEventSubscriber.from_config(bus, settings, router)


def _free_port_of(bind: str, role: str) -> str:
    """``bind`` with port 0 (tcp), or a name of its own (ipc, inproc)."""
    if bind.startswith("tcp://"):
        return bind.rsplit(":", 1)[0] + ":0"
    return f"{bind}-{role}"


def check_workers_hash_like(settings: HashSettings, infos: list[dict]) -> None:
    """Raises: ValueError when a worker salts or chunks its keys otherwise than the
    subscriber re-hashes (its events would all mismatch)."""
    for info in infos:
        if (info["model_id"], info["block_size"]) != (settings.model_id, settings.block_size):
            raise ValueError(f"a vLLM worker hashes with model {info['model_id']!r}, block "
                             f"{info['block_size']}; the router with {settings.model_id!r}, "
                             f"{settings.block_size}")
