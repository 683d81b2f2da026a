"""Always the same level: the baselines (always lossless, int8, lowest, recompute)."""

from __future__ import annotations

from kvcluster.transfer.policy import ChunkPlan, LevelPolicy


class FixedLevelPolicy(LevelPolicy):
    def __init__(self, level: str):
        self.level = level
        self.name = f"always-{level}"

    def choose(self, plan: ChunkPlan) -> str:
        return self.level
