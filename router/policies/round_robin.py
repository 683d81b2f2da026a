"""Round-robin baseline: ignores caches and load."""

from __future__ import annotations

from router.decision import Candidates, RouteDecision, RouteRequest
from router.policies.base import RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def choose(self, request: RouteRequest, candidates: Candidates) -> RouteDecision:
        chosen = self._turn % len(candidates)
        self._turn += 1
        matched = candidates.matched_blocks()[chosen]
        return self._decision(candidates, chosen, None, matched, "round_robin: next in turn")
