"""Prefix-only baseline: the longest cached prefix, load ignored (ties rotate)."""

from __future__ import annotations

from router.decision import Candidates, RouteDecision, RouteRequest
from router.policies.base import RoutingPolicy


class PrefixOnlyPolicy(RoutingPolicy):
    name = "prefix_only"

    def choose(self, request: RouteRequest, candidates: Candidates) -> RouteDecision:
        matched = candidates.matched_blocks()
        negated = [-m for m in matched]
        chosen = self._argmin(negated)
        reason = f"prefix_only: {matched[chosen]}/{len(request.block_hashes)} blocks cached"
        return self._decision(candidates, chosen, negated, matched[chosen], reason)
