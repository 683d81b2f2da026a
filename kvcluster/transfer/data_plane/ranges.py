"""The sender's bookkeeping of a granted window: which ranges it may write.

Chunks are placed first-fit and freed out of order (a chunk is freed when the
receiver has stored it, or rejected that attempt), so the window works as a
ring whose reader may skip ahead.
"""

from __future__ import annotations

import asyncio
import bisect


class RangeAllocator:
    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"window size must be positive, got {size}")
        self.size = size
        self._starts: list[int] = []
        """Allocated ranges, sorted by start."""
        self._lengths: dict[int, int] = {}
        self._freed = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        return sum(self._lengths.values())

    def can_allocate(self, length: int) -> bool:
        return self._find(length) is not None

    def allocate(self, length: int) -> int | None:
        """The offset of a free range of ``length`` bytes, or None while none is free."""
        if length <= 0 or length > self.size:
            raise ValueError(f"cannot place {length} bytes in a window of {self.size}")
        offset = self._find(length)
        if offset is not None:
            bisect.insort(self._starts, offset)
            self._lengths[offset] = length
        return offset

    async def wait_allocate(self, length: int) -> int:
        """Allocate, waiting for frees while the window is full."""
        while (offset := self.allocate(length)) is None:
            self._freed.clear()
            await self._freed.wait()
        return offset

    def free(self, offset: int) -> None:
        """Give back the range at ``offset`` (unknown offsets are ignored: a release
        may repeat a nak's)."""
        if self._lengths.pop(offset, None) is not None:
            self._starts.remove(offset)
            self._freed.set()

    def _find(self, length: int) -> int | None:
        position = 0
        for start in self._starts:
            if start - position >= length:
                return position
            position = start + self._lengths[start]
        return position if self.size - position >= length else None
