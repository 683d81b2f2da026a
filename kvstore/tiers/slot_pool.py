"""A preallocated pool of chunk-sized slots with a free list (device, host).

    pool: uint8 [num_slots, chunk_bytes]   allocated and touched once

A put copies into a free slot (``copy_`` into pages already faulted in: no
allocation, no page faults on the hot path); a get copies out of it.
"""

from __future__ import annotations

import threading

import torch

from kvstore.chunk_spec import ChunkSpec
from kvstore.copy import copy_kv
from kvstore.policy import EvictionPolicy
from kvstore.tiers.base import StorageTier


class SlotPoolTier(StorageTier):
    peekable = True

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
        *,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
    ):
        super().__init__(spec, capacity_bytes, policy, lock)
        self.num_slots = capacity_bytes // spec.chunk_bytes
        self.device = torch.device(device)
        self._pool = torch.empty(
            (self.num_slots, spec.chunk_bytes), dtype=torch.uint8, device=self.device,
            pin_memory=pin_memory,
        )
        self._pool.zero_()  # touch every page now, not on the first put
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        """Stack: slot 0 is handed out first."""
        self._slot_of: dict[bytes, int] = {}

    def has_space(self) -> bool:
        return bool(self._free_slots)

    def write(self, key: bytes, src: torch.Tensor, tenant: str = "") -> bool:
        copy_kv(self.allocate(key), src)
        return True

    def allocate(self, key: bytes) -> torch.Tensor:
        """Reserve a slot for ``key`` and return its typed view to fill."""
        slot = self._free_slots.pop()
        self._slot_of[key] = slot
        self._charge(key, self.spec.chunk_bytes)
        return self.spec.typed(self._pool[slot])

    def read_into(self, key: bytes, dst: torch.Tensor) -> bool:
        view = self.peek(key)
        if view is None:
            return False
        copy_kv(dst, view)
        return True

    def peek(self, key: bytes) -> torch.Tensor | None:
        slot = self._slot_of.get(key)
        return None if slot is None else self.spec.typed(self._pool[slot])

    def slot_of(self, key: bytes) -> int | None:
        return self._slot_of.get(key)

    def _discard(self, key: bytes) -> None:
        self._free_slots.append(self._slot_of.pop(key))
