"""Reusable receive buffers for multi-part chunks.

A fresh 20 MiB ``bytearray`` per chunk costs a zeroing pass plus a page fault
per 4 KiB before the parts are even copied in (the receiver's top cost in a
profile of bench/transfer.py). Buffers are handed back once the chunk is
decoded into its sink (sinks copy what they keep), so steady streaming reuses
warm pages.
"""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self, max_buffers: int = 8):
        self.max_buffers = max_buffers
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # buffers come back from decode threads

    def take(self, num_bytes: int) -> memoryview:
        """A writable buffer of exactly ``num_bytes`` (contents undefined)."""
        with self._lock:
            for i, array in enumerate(self._free):
                if len(array) >= num_bytes:
                    return memoryview(self._free.pop(i))[:num_bytes]
        return memoryview(np.empty(num_bytes, dtype=np.uint8))

    def give(self, buffer: memoryview) -> None:
        """Return a buffer from :meth:`take`; its contents may be overwritten at once."""
        array = buffer.obj
        assert isinstance(array, np.ndarray)
        with self._lock:
            if len(self._free) < self.max_buffers:
                self._free.append(array)
