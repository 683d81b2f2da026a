"""S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO
and a ghost FIFO of recently evicted keys.

Why it suits a KV store: most prefixes are used once (a one-off prompt), so
they should leave quickly from the small queue without pushing out the hot
shared prefixes (system prompts) that live in the main queue.

* insert: into main if the key is a ghost (evicted recently, now back),
  else into small; frequency 0.
* touch: frequency += 1, capped at 3.
* evict: while small holds >= 10% of the capacity (or main is empty), take
  small's head: accessed since insert -> move to main; else evict (and
  remember it as a ghost). Otherwise take main's head: frequency > 0 ->
  decrement and reinsert at the tail; else evict.
* pinned keys are never evicted: a pinned head of small moves to main, a
  pinned head of main goes back to the tail.
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.policy.base import EvictionPolicy, IsPinned

MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity_entries: int, small_ratio: float = 0.1):
        super().__init__(capacity_entries)
        self.small_target = max(1, int(self.capacity_entries * small_ratio))
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}

    def insert(self, key: bytes) -> None:
        self.remove(key)
        queue = self._main if self._ghost.pop(key, 0) is None else self._small
        queue[key] = None
        self._freq[key] = 0

    def touch(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(MAX_FREQ, self._freq[key] + 1)

    def remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def pop_victim(self, is_pinned: IsPinned) -> bytes | None:
        # Each key is revisited at most MAX_FREQ + 1 times before it is
        # evicted, unless pinned: the budget ends a scan of all-pinned keys.
        for _ in range((MAX_FREQ + 2) * (len(self._freq) + 1)):
            if not self._freq:
                return None
            take_small = self._small and (
                len(self._small) >= self.small_target or not self._main
            )
            key = self._step_small() if take_small else self._step_main(is_pinned)
            if key is not None and not is_pinned(key):
                return self._evict(key)
            if key is not None:  # pinned head of small: keep it, in main
                self._small.pop(key)
                self._main[key] = None
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: bytes) -> bool:
        return key in self._freq

    # ------------------------------------------------------------ private

    def _step_small(self) -> bytes | None:
        """Head of small: a candidate to evict, or moved to main (None)."""
        key = next(iter(self._small))
        if self._freq[key] > 0:
            self._small.pop(key)
            self._main[key] = None
            self._freq[key] = 0
            return None
        return key

    def _step_main(self, is_pinned: IsPinned) -> bytes | None:
        """Head of main: evicted if cold and unpinned, else rotated (None)."""
        key = next(iter(self._main))
        if self._freq[key] > 0 or is_pinned(key):
            self._freq[key] = max(0, self._freq[key] - 1)
            self._main.move_to_end(key)
            return None
        return key

    def _evict(self, key: bytes) -> bytes:
        was_small = self._small.pop(key, 0) is None
        self._main.pop(key, None)
        del self._freq[key]
        if was_small:
            self._ghost[key] = None
            while len(self._ghost) > self.capacity_entries:
                self._ghost.popitem(last=False)
        return key
