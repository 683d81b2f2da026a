"""Host tier: one preallocated DRAM buffer, pinned when CUDA is present so
device <-> host copies run by DMA at full PCIe speed."""

from __future__ import annotations

import threading

import torch

from kvcluster.common.events import Tier
from kvstore.chunk_spec import ChunkSpec
from kvstore.policy import EvictionPolicy
from kvstore.tiers.slot_pool import SlotPoolTier


class HostTier(SlotPoolTier):
    kind = Tier.HOST

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
        *,
        pin_memory: bool | None = None,
    ):
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        super().__init__(spec, capacity_bytes, policy, lock, device="cpu", pin_memory=pin_memory)
