"""Registered memory of a receiver, lent window by window to transfers.

Registering memory is the expensive part (page faults and zeroing of fresh pages,
many times slower than copying into touched ones; pinning and RDMA registration on
a GPU node), so buffers are made once and reused. A
transfer asks for the bytes it can use (its chunks in flight and waiting to be
decoded, capped at ``transfer.data_plane_window_bytes``); it gets the smallest
free buffer that is large enough, else a new one while the pool's total stays
within ``transfer.data_plane_buffer_bytes`` (free smaller ones are dropped to
make room), else nothing (its chunks then go inline).
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

B = TypeVar("B")
"""A backend's registered buffer (numpy array, shared-memory segment, ...)."""


class WindowPool(Generic[B]):
    def __init__(self, make: Callable[[int], B], drop: Callable[[B], None],
                 size_of: Callable[[B], int], budget_bytes: int):
        """
        Args:
            make: registers a new buffer of that many bytes.
            drop: gives a buffer back (unregister, unlink, unmap).
            size_of: a buffer's bytes.
            budget_bytes: most bytes registered at once.
        """
        self._make, self._drop, self._size_of = make, drop, size_of
        self.budget_bytes = budget_bytes
        self._free: list[B] = []
        self._registered_bytes = 0
        self._lock = threading.Lock()

    @property
    def registered_bytes(self) -> int:
        return self._registered_bytes

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, num_bytes: int) -> B | None:
        """A buffer of at least ``num_bytes`` (a page multiple), or None within the budget."""
        num_bytes = _pages(num_bytes)
        with self._lock:
            fitting = [b for b in self._free if self._size_of(b) >= num_bytes]
            if fitting:
                best = min(fitting, key=self._size_of)
                self._free.remove(best)
                return best
            victims = self._make_room(num_bytes)
            if victims is None:
                return None
            self._registered_bytes += num_bytes
        for victim in victims:
            self._drop(victim)
        try:
            return self._make(num_bytes)
        except Exception:
            with self._lock:
                self._registered_bytes -= num_bytes
            raise

    def warm(self, num_bytes: int) -> bool:
        """Register one free buffer of ``num_bytes`` ahead of the first transfer (registering
        is what costs); False when the budget has no room for it."""
        buffer = self.take(num_bytes)
        if buffer is None:
            return False
        self.give(buffer)
        return True

    def give(self, buffer: B, reuse: bool = True) -> None:
        """Return a buffer; ``reuse=False`` drops it (a late write may still hit it)."""
        if reuse:
            with self._lock:
                self._free.append(buffer)
            return
        self._forget(buffer)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for buffer in free:
            self._forget(buffer)

    def _forget(self, buffer: B) -> None:
        with self._lock:
            self._registered_bytes -= self._size_of(buffer)
        self._drop(buffer)

    def _make_room(self, num_bytes: int) -> list[B] | None:
        """Free buffers to drop so ``num_bytes`` more fit the budget (lock held)."""
        if num_bytes > self.budget_bytes:
            return None
        victims: list[B] = []
        spare = sorted(self._free, key=self._size_of)
        while self._registered_bytes + num_bytes > self.budget_bytes:
            if not spare:
                for victim in victims:  # not enough: keep them
                    self._registered_bytes += self._size_of(victim)
                    self._free.append(victim)
                return None
            victim = spare.pop(0)
            self._free.remove(victim)
            self._registered_bytes -= self._size_of(victim)
            victims.append(victim)
        return victims


PAGE_BYTES = 4096


def _pages(num_bytes: int) -> int:
    return max(PAGE_BYTES, -(-num_bytes // PAGE_BYTES) * PAGE_BYTES)
