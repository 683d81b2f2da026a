"""SLO-adaptive level choice (CacheGen's streaming adaptation, with a risk check).

Per chunk ``i`` of ``n``, the best level ``L`` that passes both tests::

    share:  cost(L) <= time_left / (n - i)            # an equal share of what is left
    risk:   P[finish(L) > time_left] <= slo_risk      # still recoverable after a bad draw

    cost(L)   = max(size(L) / (safety * bandwidth),    # on the wire ...
                    num_tokens / decode_tokens_per_s(L))  # ... or decoding, pipelined
    finish(L) = this chunk at L, then every later chunk at the lowest level,
                with each chunk's seconds per byte drawn from the link's recent samples

    if none passes:
        text   if num_tokens / prefill_tokens_per_s < cost(lowest)
        lowest otherwise

The share test spreads quality evenly; on its own it is a per-chunk gamble:
``bandwidth`` is a low quantile of the recent samples, so each chunk beats it
with probability ~95 %, but a request of 8 chunks then meets one worse draw
about a third of the time, and a chunk at a large level on a 1-in-100 draw
(0.1 Gbit/s on the 0.1-10 Gbit/s trace) can cost more than the whole SLO has
left. The risk test allows a level only if, should this chunk be slow, the
rest can still be sent at the lowest level in time, judged by resampling the
estimator's measured per-chunk times (``draws`` times, seeded: the same plan
gets the same answer). ``finish`` counts the wire (sequential) and the
receiver's decode (sequential too, overlapping the wire), whichever is slower,
plus the last chunk's decode, which happens after its last byte arrived.

Wire and decode overlap (chunk i decodes while i+1 is on the wire), so a
chunk costs the slower of the two; a level's decode speed is what the
receiver measured (unknown: not counted).

Before any bandwidth estimate exists (the very first chunk on a link) the
chunk is sent at ``probe_level`` and timed: that is the probe. ``safety`` (< 1)
plans the share test with a fraction of the estimated bandwidth, which absorbs
estimate error and the per-chunk overheads the estimate does not see.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvcluster.transfer.messages import TEXT_LEVEL
from kvcluster.transfer.policy import ChunkPlan, LevelPolicy

DEFAULT_SLO_RISK = 0.01
"""Largest chance a level choice may leave of missing the SLO; per chunk, so a request
of n chunks risks up to ~n times this in the worst case (usually far less: the test
only binds when the deadline is near)."""


class AdaptivePolicy(LevelPolicy):
    name = "adaptive"

    def __init__(self, level_names: Sequence[str], probe_level: str | None = None,
                 bandwidth_safety: float = 0.8, slo_risk: float = DEFAULT_SLO_RISK,
                 draws: int = 1024, seed: int = 0):
        """
        Args:
            level_names: best quality first.
            probe_level: level of the probe chunk; default: the middle level.
            bandwidth_safety: fraction of the estimated bandwidth the share test plans with.
            slo_risk: the risk test's bound; 1 turns the test off.
            draws: resampled scenarios per risk test.
            seed: of the resampling.
        """
        if not level_names:
            raise ValueError("AdaptivePolicy needs at least one level")
        if not 0 < bandwidth_safety <= 1:
            raise ValueError(f"bandwidth_safety must be in (0, 1], got {bandwidth_safety}")
        if not 0 < slo_risk <= 1:
            raise ValueError(f"slo_risk must be in (0, 1], got {slo_risk}")
        self.level_names = list(level_names)
        self.probe_level = probe_level or self.level_names[len(self.level_names) // 2]
        self.bandwidth_safety = bandwidth_safety
        self.slo_risk = slo_risk
        self.draws = draws
        self.seed = seed

    def choose(self, plan: ChunkPlan) -> str:
        if plan.bytes_per_s is None:
            return self.probe_level
        budget_s = plan.time_left_s / plan.chunks_left
        samples = (_with_unseen_tail(plan.seconds_per_byte) if plan.seconds_per_byte
                   else np.array([1.0 / plan.bytes_per_s]))  # no samples: a steady link
        scenarios = None
        for level in self.level_names:
            if self._cost_s(plan, level) > budget_s:
                continue
            if scenarios is None:
                scenarios = self._scenarios(plan, samples)
            if self._recoverable(plan, level, *scenarios):
                return level
        return self._fallback(plan)

    # ------------------------------------------------------------ helpers

    def _fallback(self, plan: ChunkPlan) -> str:
        lowest = self.level_names[-1]
        if plan.prefill_tokens_per_s <= 0:
            return lowest
        recompute_s = plan.num_tokens / plan.prefill_tokens_per_s
        return TEXT_LEVEL if recompute_s < self._cost_s(plan, lowest) else lowest

    def _cost_s(self, plan: ChunkPlan, level: str) -> float:
        assert plan.bytes_per_s is not None
        wire_s = plan.bytes_by_level[level] / (plan.bytes_per_s * self.bandwidth_safety)
        return max(wire_s, self._decode_s(plan, level, plan.num_tokens))

    @staticmethod
    def _decode_s(plan: ChunkPlan, level: str, num_tokens: int) -> float:
        decode_tps = plan.decode_tokens_per_s.get(level, 0.0)
        return num_tokens / decode_tps if decode_tps > 0 else 0.0

    def _scenarios(self, plan: ChunkPlan, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``draws`` scenarios: seconds per byte of this chunk ``[draws]``, and the
        cumulative wire seconds of the later chunks at the lowest level ``[draws, later]``."""
        rng = np.random.default_rng(self.seed)
        later = plan.chunks_left - 1
        per_byte = samples[rng.integers(0, len(samples), size=(self.draws, 1 + later))]
        lowest_bytes = plan.bytes_by_level[self.level_names[-1]]
        later_bytes = (lowest_bytes * plan.tokens_after / plan.num_tokens / later
                       if later and plan.num_tokens else 0.0)
        return per_byte[:, 0], np.cumsum(per_byte[:, 1:] * later_bytes, axis=1)

    def _recoverable(self, plan: ChunkPlan, level: str, this_per_byte: np.ndarray,
                     later_wire_s: np.ndarray) -> bool:
        """Whether sending this chunk at ``level`` and the rest at the lowest level
        finishes within ``time_left`` with probability >= 1 - slo_risk.

        Wire and decoder are two sequential stages (chunk k decodes once it has
        arrived and chunk k-1 is decoded), so the last decode ends at
        ``max over k of (arrival of chunk k + decode of chunks k..end)``.
        """
        if self.slo_risk >= 1:
            return True
        later = plan.chunks_left - 1
        decode_later = (self._decode_s(plan, self.level_names[-1], plan.tokens_after // later)
                        if later else 0.0)
        arrival = this_per_byte * plan.bytes_by_level[level]  # [draws]
        finish = arrival + self._decode_s(plan, level, plan.num_tokens) + later * decode_later
        if later:
            arrivals = arrival[:, None] + later_wire_s  # [draws, later]
            decodes_from = decode_later * np.arange(later, 0, -1)  # chunks k..end
            finish = np.maximum(finish, (arrivals + decodes_from).max(axis=1))
        return float(np.mean(finish > plan.time_left_s)) <= self.slo_risk


UNSEEN_TAIL_FACTOR = 2.0
"""The risk test's stand-in for a draw slower than any sample yet: this many times the
slowest one."""


def _with_unseen_tail(samples) -> np.ndarray:
    """The samples plus one stand-in for what they have not shown yet.

    After n draws, the next one is slower than all of them with probability
    1 / (n + 1); resampling n + 1 values with this one among them gives it that
    probability. So a young estimator (a new link, a few chunks) is cautious
    and the caution fades as samples accumulate.
    """
    values = np.asarray(samples, dtype=float)
    return np.append(values, UNSEEN_TAIL_FACTOR * values.max())
