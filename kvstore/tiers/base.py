"""One level of the store: a byte budget, an index of chunk keys, a policy.

The store decides (what goes where, what to evict); a tier only does: it
charges bytes, copies chunks in and out, and forgets them. Every tier is
used under the store's lock (passed in), so a tier's index, its policy and
the store's index change together.

Invariant: ``used_bytes <= capacity_bytes`` after every call.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Callable

import torch

from kvcluster.common.events import Tier
from kvstore.chunk_spec import ChunkSpec
from kvstore.policy import EvictionPolicy

LostCallback = Callable[["StorageTier", list[bytes], str], None]
"""(tier, keys, reason): the tier dropped these keys on its own."""


class StorageTier(ABC):
    kind: Tier
    peekable = False
    """True when :meth:`peek` returns a zero-copy view (memory tiers)."""

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
    ):
        self.spec = spec
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.lock = lock or threading.RLock()
        self.used_bytes = 0
        self._charged: dict[bytes, int] = {}
        """key -> bytes charged against the capacity."""
        self.on_lost: LostCallback = lambda tier, keys, reason: None

    # ---------------------------------------------------------- index

    def __contains__(self, key: bytes) -> bool:
        return key in self._charged

    def __len__(self) -> int:
        return len(self._charged)

    def keys(self) -> list[bytes]:
        return list(self._charged)

    @property
    def name(self) -> str:
        return self.kind.name.lower()

    # ---------------------------------------------------------- space

    @property
    def available(self) -> bool:
        """False while the tier cannot take or serve chunks (Redis down)."""
        return True

    @property
    def is_up(self) -> bool:
        """Like ``available`` but never probes (safe from a metrics scrape)."""
        return True

    def accepting(self) -> bool:
        """Whether a write could start now, space aside (queue slots, health)."""
        return self.available

    def charge_per_chunk(self) -> int:
        """Bytes one new chunk reserves against the capacity (an upper bound)."""
        return self.spec.chunk_bytes

    def has_space(self) -> bool:
        return self.used_bytes + self.charge_per_chunk() <= self.capacity_bytes

    def can_ever_hold(self) -> bool:
        return self.charge_per_chunk() <= self.capacity_bytes

    # ---------------------------------------------------------- data

    @abstractmethod
    def write(self, key: bytes, src: torch.Tensor, tenant: str = "") -> bool:
        """Store chunk ``src`` (typed chunk shape, any strides/device).

        The caller made room (``has_space()`` and ``accepting()``). Returns
        False if the tier refused it after all.
        """

    @abstractmethod
    def read_into(self, key: bytes, dst: torch.Tensor) -> bool:
        """Copy the chunk into ``dst`` (typed chunk shape). False when the
        chunk is gone or corrupt: the tier then forgets it and reports it
        through ``on_lost``."""

    def read_many(self, keys: list[bytes], dsts: list[torch.Tensor]) -> list[bool]:
        """Read several chunks; stops at the first failure (the rest False)."""
        oks: list[bool] = []
        for key, dst in zip(keys, dsts):
            oks.append(self.read_into(key, dst))
            if not oks[-1]:
                break
        return oks + [False] * (len(keys) - len(oks))

    def peek(self, key: bytes) -> torch.Tensor | None:
        """A zero-copy typed view of a stored chunk, or None."""
        return None

    def delete(self, key: bytes) -> None:
        """Forget a chunk and free its bytes (no-op if absent)."""
        if key in self._charged:
            self._release(key)
            self._discard(key)

    def clear(self) -> None:
        for key in list(self._charged):
            self.delete(key)

    def flush(self) -> None:
        """Wait until background work (disk writes) is done."""

    def close(self) -> None:
        """Stop background work; the tier is unusable afterwards."""

    # ---------------------------------------------------------- for subclasses

    def _charge(self, key: bytes, nbytes: int) -> None:
        assert key not in self._charged, "a key is charged once"
        self._charged[key] = nbytes
        self.used_bytes += nbytes
        self.policy.insert(key)
        assert self.used_bytes <= self.capacity_bytes, (self.used_bytes, self.capacity_bytes)

    def _recharge(self, key: bytes, nbytes: int) -> None:
        """Adjust a charge downwards once the true size is known."""
        self.used_bytes += nbytes - self._charged[key]
        self._charged[key] = nbytes

    def _release(self, key: bytes) -> None:
        self.used_bytes -= self._charged.pop(key)
        self.policy.remove(key)

    def _lose(self, keys: list[bytes], reason: str) -> None:
        """Forget ``keys`` on the tier's own initiative and tell the store."""
        lost = [k for k in keys if k in self._charged]
        for key in lost:
            self.delete(key)
        if lost:
            self.on_lost(self, lost, reason)

    @abstractmethod
    def _discard(self, key: bytes) -> None:
        """Free the storage behind a chunk whose charge was released."""
