"""Least-loaded baseline: fewest queued prefill tokens, then decodes, then KV memory."""

from __future__ import annotations

from router.decision import Candidates, RouteDecision, RouteRequest
from router.policies.base import RoutingPolicy


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def choose(self, request: RouteRequest, candidates: Candidates) -> RouteDecision:
        keys = candidates.memo.get(self.name)
        if keys is None:
            keys = candidates.memo[self.name] = [
                (l.queued_prefill_tokens, l.active_decode_requests, l.kv_usage)
                for l in candidates.loads]
        chosen = self._argmin(keys)
        matched = candidates.matched_blocks()[chosen]
        reason = f"least_loaded: {keys[chosen][0]} tokens queued, {keys[chosen][1]} decoding"
        return self._decision(candidates, chosen, keys, matched, reason)
