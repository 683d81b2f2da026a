"""Bandwidth traces for benchmarks: the rate of each chunk of each request.

CacheGen's evaluation setting: constant 0.1, 1 and 10 Gbit/s, and a trace
redrawn per chunk uniformly in 0.1-10 Gbit/s. Draws are seeded per
(request, chunk), so every policy sees the same rates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BandwidthTrace:
    name: str
    low_bps: float
    high_bps: float
    """Equal to low_bps for a constant trace."""
    seed: int = 0

    @property
    def constant(self) -> bool:
        return self.low_bps == self.high_bps

    def rate_bps(self, request_no: int, chunk_index: int) -> float:
        if self.constant:
            return self.low_bps
        rng = random.Random(self.seed * 1_000_003 + request_no * 1_009 + chunk_index)
        return rng.uniform(self.low_bps, self.high_bps)


def standard_traces(seed: int = 0) -> list[BandwidthTrace]:
    gbit = 1e9
    return [BandwidthTrace("0.1 Gbit/s", 0.1 * gbit, 0.1 * gbit),
            BandwidthTrace("1 Gbit/s", 1 * gbit, 1 * gbit),
            BandwidthTrace("10 Gbit/s", 10 * gbit, 10 * gbit),
            BandwidthTrace("varying 0.1-10 Gbit/s", 0.1 * gbit, 10 * gbit, seed)]
