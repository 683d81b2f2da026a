"""The routing-policy interface: score candidates, return a decision. Never moves KV."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

from router.decision import Candidates, RouteDecision, RouteRequest


class RoutingPolicy(ABC):
    name: ClassVar[str]
    num_fallbacks: int = 2
    """Next-best instances listed after the chosen one in a decision."""

    def __init__(self) -> None:
        self._turn = 0

    @abstractmethod
    def choose(self, request: RouteRequest, candidates: Candidates) -> RouteDecision:
        """Pick an instance among ``candidates`` (non-empty) for ``request``."""

    # ------------------------------------------------------------ helpers

    def _argmin(self, costs: Sequence[float]) -> int:
        """Index of the lowest cost; exact ties rotate so cold requests spread out."""
        best = min(costs)
        ties = [i for i, c in enumerate(costs) if c == best]
        self._turn += 1
        return ties[self._turn % len(ties)] if len(ties) > 1 else ties[0]

    def _decision(self, candidates: Candidates, chosen: int, costs: Sequence[float] | None,
                  matched_blocks: int, reason: str) -> RouteDecision:
        ids = candidates.instance_ids
        ranked = [ids[chosen]]
        if costs is not None and self.num_fallbacks:
            order = sorted(range(len(ids)), key=costs.__getitem__)[: self.num_fallbacks + 1]
            ranked += [ids[i] for i in order if i != chosen][: self.num_fallbacks]
        return RouteDecision(ranked, matched_blocks, matched_blocks * candidates.tokens_per_hash,
                             reason, self.name)
