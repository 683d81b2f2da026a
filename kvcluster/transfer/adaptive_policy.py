"""SLO-adaptive level choice (CacheGen's streaming adaptation).

Per chunk ``i`` of ``n``::

    budget_i = time_left / (n - i)                    # an equal share of what is left
    cost(L)  = max(size(L) / (safety * bandwidth),    # on the wire ...
                   num_tokens / decode_tokens_per_s(L))  # ... or decoding, pipelined
    level    = best level L with cost(L) <= budget_i
    if none fits:
        text   if num_tokens / prefill_tokens_per_s < cost(lowest)
        lowest otherwise

Wire and decode overlap (chunk i decodes while i+1 is on the wire), so a
chunk costs the slower of the two; a level's decode speed is what the
receiver measured (unknown: not counted).

Before any bandwidth estimate exists (the very first chunk on a link) the
chunk is sent at ``probe_level`` and timed: that is the probe. ``safety`` (< 1)
plans with a fraction of the estimated bandwidth, which absorbs estimate error
and the per-chunk overheads the estimate does not see.
"""

from __future__ import annotations

from typing import Sequence

from kvcluster.transfer.messages import TEXT_LEVEL
from kvcluster.transfer.policy import ChunkPlan, LevelPolicy


class AdaptivePolicy(LevelPolicy):
    name = "adaptive"

    def __init__(self, level_names: Sequence[str], probe_level: str | None = None,
                 bandwidth_safety: float = 0.8):
        """
        Args:
            level_names: best quality first.
            probe_level: level of the probe chunk; default: the middle level.
            bandwidth_safety: fraction of the estimated bandwidth planned with.
        """
        if not level_names:
            raise ValueError("AdaptivePolicy needs at least one level")
        if not 0 < bandwidth_safety <= 1:
            raise ValueError(f"bandwidth_safety must be in (0, 1], got {bandwidth_safety}")
        self.level_names = list(level_names)
        self.probe_level = probe_level or self.level_names[len(self.level_names) // 2]
        self.bandwidth_safety = bandwidth_safety

    def choose(self, plan: ChunkPlan) -> str:
        if plan.bytes_per_s is None:
            return self.probe_level
        budget_s = plan.time_left_s / plan.chunks_left
        for level in self.level_names:
            if self._cost_s(plan, level) <= budget_s:
                return level
        return self._fallback(plan)

    def _fallback(self, plan: ChunkPlan) -> str:
        lowest = self.level_names[-1]
        if plan.prefill_tokens_per_s <= 0:
            return lowest
        recompute_s = plan.num_tokens / plan.prefill_tokens_per_s
        return TEXT_LEVEL if recompute_s < self._cost_s(plan, lowest) else lowest

    def _cost_s(self, plan: ChunkPlan, level: str) -> float:
        assert plan.bytes_per_s is not None
        wire_s = plan.bytes_by_level[level] / (plan.bytes_per_s * self.bandwidth_safety)
        decode_tps = plan.decode_tokens_per_s.get(level, 0.0)
        return max(wire_s, plan.num_tokens / decode_tps if decode_tps > 0 else 0.0)
