"""Least recently used: the classic, and the default."""

from __future__ import annotations

from collections import OrderedDict

from kvstore.policy.base import EvictionPolicy, IsPinned


class LRUPolicy(EvictionPolicy):
    """Evicts the chunk whose last insert or access is oldest."""

    def __init__(self, capacity_entries: int):
        super().__init__(capacity_entries)
        self._order: OrderedDict[bytes, None] = OrderedDict()
        """Oldest first."""

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def pop_victim(self, is_pinned: IsPinned) -> bytes | None:
        for key in self._order:
            if not is_pinned(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order
