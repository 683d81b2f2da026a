"""KV-aware routing: the lowest estimated time to first token.

For candidate i (all terms in milliseconds)::

    cost_i = ms_tok * num_tokens                                     prefill with no hit
           - w * sum_t (ms_tok - load_ms_tok[t]) * cached_tokens_i[t]  what the hits save
           + ms_tok * queued_prefill_tokens_i                        waiting behind its queue
           + decode_request_ms * active_decode_requests_i            decode interference
           + kv_memory_ms * kv_used_fraction_i                       memory pressure

    ms_tok        = 1000 / prefill_tokens_per_s
    load_ms_tok[t] = min(ms_tok, 1000 * kv_bytes_per_token / (tier_gbps[t] * 1e9))  (0 if unknown)

``cached_tokens_i[t]`` are the tokens of instance i's longest matching prefix
served from tier t (see :meth:`PrefixMatch.tier_blocks`): a hit is worth the
prefill it saves minus its estimated transfer time, never less than zero. With
``w = overlap_weight = 1`` the cost is the estimated TTFT; ``w > 1`` also
values cache affinity (the next request with this prefix finds it here, and
the prefix is not duplicated elsewhere), which the trace replay rewards.
Temperature 0 picks the minimum (exact ties rotate); T > 0 samples from a
softmax over ``-(cost - min) / (max - min) / T``.
"""

from __future__ import annotations

import math
import random

from kvcluster.common.config import RouterConfig
from router.decision import Candidates, RouteDecision, RouteRequest
from router.load import InstanceLoad
from router.policies.base import RoutingPolicy


class KVAwarePolicy(RoutingPolicy):
    name = "kv_aware"

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.ms_per_token = 1000.0 / config.prefill_tokens_per_s
        self.load_ms_per_token = [self._load_ms(config.kv_bytes_per_token, gbps)
                                  for gbps in config.tier_gbps]
        self.overlap_weight = config.overlap_weight
        self.decode_request_ms = config.decode_request_ms
        self.kv_memory_ms = config.kv_memory_ms
        self.temperature = config.temperature
        self._rng = random.Random(config.seed)

    def load_cost_ms(self, load: InstanceLoad) -> float:
        """The request-independent part of the cost: queue, decodes, memory."""
        return (self.ms_per_token * load.queued_prefill_tokens
                + self.decode_request_ms * load.active_decode_requests
                + self.kv_memory_ms * load.kv_usage)

    def hit_saving_ms(self, tier_blocks: tuple[int, ...], tokens_per_hash: int) -> float:
        """Weighted milliseconds a cached prefix saves: prefill avoided minus loading, per tier."""
        return self.overlap_weight * sum(
            n * tokens_per_hash * (self.ms_per_token - load_ms)
            for n, load_ms in zip(tier_blocks, self.load_ms_per_token) if n)

    def choose(self, request: RouteRequest, candidates: Candidates) -> RouteDecision:
        base = candidates.memo.get(self.name)
        if base is None:
            base = candidates.memo[self.name] = [self.load_cost_ms(l) for l in candidates.loads]
        full = self.ms_per_token * request.num_tokens
        costs = [full + b for b in base]
        matched, per_hash = candidates.matched_blocks(), candidates.tokens_per_hash
        for i, m in enumerate(matched):
            if m:
                costs[i] -= self.hit_saving_ms(candidates.tier_blocks(i), per_hash)
        chosen = self._sample(costs) if self.temperature > 0 else self._argmin(costs)
        load = candidates.loads[chosen]
        reason = (f"kv_aware: score {costs[chosen]:.1f} ms; {matched[chosen]}/"
                  f"{len(request.block_hashes)} blocks cached, "
                  f"{load.queued_prefill_tokens} tokens queued")
        return self._decision(candidates, chosen, costs, matched[chosen], reason)

    # ------------------------------------------------------------ helpers

    def _sample(self, costs: list[float]) -> int:
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return self._rng.choices(range(len(costs)), weights)[0]

    def _load_ms(self, bytes_per_token: int, gbps: float) -> float:
        if bytes_per_token <= 0 or gbps <= 0:
            return 0.0
        return min(self.ms_per_token, 1000.0 * bytes_per_token / (gbps * 1e9))
