"""The eviction-policy interface shared by every tier.

A policy only orders keys; it never touches data. Keys are chunk digests
(``BlockHash.digest``, 32 bytes). The tier tells the policy about inserts,
accesses and removals; the store asks it for the next victim, skipping keys
that are pinned (in use by a request).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

IsPinned = Callable[[bytes], bool]


class EvictionPolicy(ABC):
    """Decides which stored chunk leaves a tier first."""

    def __init__(self, capacity_entries: int):
        self.capacity_entries = max(1, capacity_entries)
        """How many chunks the tier holds when full (a sizing hint)."""

    @abstractmethod
    def insert(self, key: bytes) -> None:
        """A chunk entered the tier."""

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """A chunk in the tier was read or written again (no-op if absent)."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """A chunk left the tier for another reason (no-op if absent)."""

    @abstractmethod
    def pop_victim(self, is_pinned: IsPinned) -> bytes | None:
        """Choose, forget and return the next chunk to evict; None if every
        chunk is pinned (or the tier is empty)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: bytes) -> bool: ...

    def eviction_order(self) -> list[bytes]:
        """Victims in the order they would go if nothing changed (tests, debug).

        Works on a copy, so the policy itself is unchanged.
        """
        import copy

        clone = copy.deepcopy(self)
        order = []
        while (key := clone.pop_victim(lambda _k: False)) is not None:
            order.append(key)
        return order
