"""Device tier: a slot pool on the engine's device (HBM on a GPU).

A separate pool, not the engine's paged-cache blocks: see docs/kvstore.md.
"""

from __future__ import annotations

import threading

import torch

from kvcluster.common.events import Tier
from kvstore.chunk_spec import ChunkSpec
from kvstore.policy import EvictionPolicy
from kvstore.tiers.slot_pool import SlotPoolTier


class DeviceTier(SlotPoolTier):
    kind = Tier.DEVICE

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
        *,
        device: str | torch.device = "cpu",
    ):
        super().__init__(spec, capacity_bytes, policy, lock, device=device)
