"""Build a TieredStore from the ``store`` section of the cluster config."""

from __future__ import annotations

import threading

import torch
from prometheus_client import CollectorRegistry

from kvcluster.common.config import StoreConfig
from kvcluster.common.layout import KVLayout
from kvstore.chunk_spec import ChunkSpec
from kvstore.metrics import StoreMetrics
from kvstore.store import TieredStore
from kvstore.tiers.factory import build_tiers


def build_store(
    config: StoreConfig,
    layout: KVLayout,
    *,
    device: str | torch.device = "cpu",
    model_id: str = "",
    registry: CollectorRegistry | None = None,
) -> TieredStore:
    """A store with every tier ``config`` enables.

    Args:
        layout: the engine's KV layout (chunk bytes derive from it).
        device: the engine's torch device, for the device tier's pool.
        model_id: namespaces Redis keys.
        registry: Prometheus registry (default: a fresh one per store).
    """
    spec = ChunkSpec(layout, config.chunk_tokens)
    tiers = build_tiers(config, spec, threading.RLock(), device=device, model_id=model_id)
    if not tiers:
        raise ValueError("store: every tier is disabled; enable at least one")
    return TieredStore(spec, tiers, promote_on_hit=config.promote_on_hit,
                       metrics=StoreMetrics(registry))
