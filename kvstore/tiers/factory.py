"""Build the enabled tiers from a StoreConfig, fastest first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from kvcluster.common.config import StoreConfig, TierConfig
from kvstore.chunk_spec import ChunkSpec
from kvstore.policy import EvictionPolicy, make_policy
from kvstore.tiers.base import StorageTier
from kvstore.tiers.device import DeviceTier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier
from kvstore.tiers.redis_tier import RedisTier


def build_tiers(
    config: StoreConfig,
    spec: ChunkSpec,
    lock: threading.RLock,
    *,
    device: str | torch.device = "cpu",
    model_id: str = "",
) -> list[StorageTier]:
    """Every enabled tier of ``config``, sharing ``lock``."""
    tiers: list[StorageTier] = []
    if config.device.enabled:
        tiers.append(DeviceTier(spec, config.device.capacity_bytes,
                                _policy(config.device, spec), lock, device=device))
    if config.host.enabled:
        tiers.append(HostTier(spec, config.host.capacity_bytes, _policy(config.host, spec), lock))
    if config.disk.enabled:
        d = config.disk
        tiers.append(DiskTier(spec, d.capacity_bytes, _policy(d, spec), lock,
                              directory=d.directory or default_disk_directory(),
                              compression=d.compression, max_pending_writes=d.max_pending_writes,
                              writer_threads=d.writer_threads, reader_threads=d.reader_threads,
                              verify_on_start=d.verify_on_start))
    if config.redis.enabled:
        r = config.redis
        tiers.append(RedisTier(spec, r.capacity_bytes, _policy(r, spec), lock, url=r.url,
                               model_id=model_id, ttl_s=r.ttl_s, retry_after_s=r.retry_after_s,
                               socket_timeout_s=r.socket_timeout_s, key_prefix=r.key_prefix))
    return tiers


def default_disk_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "kvcluster" / "kvstore")


def _policy(tier: TierConfig, spec: ChunkSpec) -> EvictionPolicy:
    return make_policy(tier.policy, tier.capacity_bytes // spec.chunk_bytes)
