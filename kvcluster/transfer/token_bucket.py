"""A token-bucket shaper inside the sender (used only where tc cannot be)."""

from __future__ import annotations

import asyncio
import time

from kvcluster.transfer.shaper import Shaper


class TokenBucketShaper(Shaper):
    label = "token-bucket (in-sender)"

    def __init__(self, bits_per_s: float, burst_bytes: int = 256 << 10):
        """
        Args:
            bits_per_s: the rate.
            burst_bytes: bucket depth: how far ahead of the rate a sender may get.
        """
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._last = time.perf_counter()
        self.bytes_per_s = _bytes_per_s(bits_per_s)

    def set_rate(self, bits_per_s: float) -> None:
        self._refill()
        self.bytes_per_s = _bytes_per_s(bits_per_s)

    async def acquire(self, num_bytes: int) -> None:
        """Take ``num_bytes`` tokens, sleeping while the bucket is in debt."""
        self._refill()
        self._tokens -= num_bytes
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.bytes_per_s)

    def _refill(self) -> None:
        now = time.perf_counter()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._last) * self.bytes_per_s)
        self._last = now


def _bytes_per_s(bits_per_s: float) -> float:
    if bits_per_s <= 0:
        raise ValueError(f"rate must be positive, got {bits_per_s}")
    return bits_per_s / 8
