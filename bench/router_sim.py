"""Trace replay for bench.router: simulated instances behind the real router.

Each simulated instance has an LRU cache of ``capacity_blocks`` blocks and a
FIFO prefill server (``overhead_s + uncached_tokens / prefill_tokens_per_s``).
Cache changes are published as real KV events (BlockStored on insert,
BlockRemoved on eviction) through a real :class:`KVEventPublisher` and the
in-process bus into the real router's index; loads reach the router as
registry heartbeats. Simplification: a request's blocks enter the cache (and
the index) at decision time, not when its prefill completes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from kvcluster.common.config import RouterConfig
from kvcluster.common.events import BlockRemoved, BlockStored, HashSettings, Tier
from router import InProcessEventBus, InstanceLoad, KVEventPublisher, RouteRequest, Router

TRACE_BLOCK_TOKENS = 512
SETTINGS = HashSettings("mooncake-trace", TRACE_BLOCK_TOKENS, TRACE_BLOCK_TOKENS)
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...]
    """Trace block ids mixed into 64-bit values (they stand for chained hashes)."""


@dataclass
class SimParams:
    num_instances: int = 8
    capacity_blocks: int = 1000
    prefill_tokens_per_s: float = 10000.0
    overhead_s: float = 0.005
    decode_s_per_token: float = 0.02


@dataclass
class PolicyResult:
    name: str
    hit_ratio: float
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    imbalance: float | None = None
    """max / mean of the prefill work (seconds) each instance was given."""
    requests_per_instance: list[int] = field(default_factory=list)


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            raw = json.loads(line)
            out.append(TraceRequest(raw["timestamp"] / 1000.0, raw["input_length"],
                                    raw["output_length"],
                                    tuple(mix64(h) for h in raw["hash_ids"])))
    return out


def mix64(x: int) -> int:
    """splitmix64 finaliser: spreads small trace ids over 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def unique_blocks(trace: list[TraceRequest]) -> int:
    return len({h for r in trace for h in r.block_hashes})


class LRUCache:
    """Block-capacity LRU; ``admit`` returns the prefix hit and what it evicted."""

    def __init__(self, capacity_blocks: int | None):
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def prefix_hits(self, hashes: tuple[int, ...]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def admit(self, hashes: tuple[int, ...]) -> tuple[int, list[int], list[int]]:
        """Touch the hit prefix, insert the rest. Returns (hits, stored, evicted)."""
        hits = self.prefix_hits(hashes)
        stored, evicted = [], []
        for h in hashes:
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
                stored.append(h)
        while self.capacity is not None and len(self.blocks) > self.capacity:
            victim, _ = self.blocks.popitem(last=False)
            evicted.append(victim)
        return hits, stored, evicted


def replay_reference(trace: list[TraceRequest], capacity_blocks: int | None) -> float:
    """Block hit ratio of one cache (global LRU, or infinite when None)."""
    cache = LRUCache(capacity_blocks)
    hits = total = 0
    for req in trace:
        hits += cache.admit(req.block_hashes)[0]
        total += len(req.block_hashes)
    return hits / max(1, total)


class SimInstance:
    def __init__(self, instance_id: str, params: SimParams, publisher: KVEventPublisher):
        self.instance_id = instance_id
        self.params = params
        self.cache = LRUCache(params.capacity_blocks)
        self.publisher = publisher
        self.free_at_s = 0.0
        self.busy_s = 0.0
        self.decode_ends: list[float] = []
        self.num_requests = 0

    def load(self, now_s: float) -> InstanceLoad:
        queued = max(0.0, self.free_at_s - now_s) * self.params.prefill_tokens_per_s
        self.decode_ends = [t for t in self.decode_ends if t > now_s]
        return InstanceLoad(int(queued), len(self.decode_ends),
                            len(self.cache.blocks), self.params.capacity_blocks)

    def serve(self, req: TraceRequest) -> tuple[int, float]:
        """Admit the request into cache and queue. Returns (hit blocks, TTFT seconds)."""
        hits, stored, evicted = self.cache.admit(req.block_hashes)
        if stored:
            self.publisher.on_event(BlockStored(tuple(stored), Tier.DEVICE))
        if evicted:
            self.publisher.on_event(BlockRemoved(tuple(evicted), Tier.DEVICE))
        self.publisher.flush()
        uncached = max(0, req.input_tokens - hits * TRACE_BLOCK_TOKENS)
        service_s = self.params.overhead_s + uncached / self.params.prefill_tokens_per_s
        start_s = max(req.arrival_s, self.free_at_s)
        self.free_at_s = start_s + service_s
        self.busy_s += service_s
        self.num_requests += 1
        self.decode_ends.append(self.free_at_s + req.output_tokens * self.params.decode_s_per_token)
        return hits, self.free_at_s - req.arrival_s


def replay_policy(trace: list[TraceRequest], policy: str, params: SimParams) -> PolicyResult:
    """Replay ``trace`` through a real Router with ``policy`` over simulated instances."""
    clock = _SimClock()
    config = RouterConfig(policy=policy, prefill_tokens_per_s=params.prefill_tokens_per_s,
                          heartbeat_ttl_s=1e9, silent_window_s=1e9)
    bus = InProcessEventBus()
    router = Router(config, SETTINGS, bus=bus, clock=clock)
    instances = {}
    for i in range(params.num_instances):
        iid = f"sim-{i}"
        router.registry.register(iid)
        pub = KVEventPublisher(iid, SETTINGS, bus, max_batch_events=1 << 30)
        pub.announce()
        instances[iid] = SimInstance(iid, params, pub)
    hits = total = 0
    ttfts = []
    for req in trace:
        clock.now = req.arrival_s
        for inst in instances.values():
            router.registry.heartbeat(inst.instance_id, inst.load(req.arrival_s))
        router.pump_events()
        decision = router.route(RouteRequest(req.block_hashes, req.input_tokens))
        h, ttft = instances[decision.instance_id].serve(req)
        hits += h
        total += len(req.block_hashes)
        ttfts.append(ttft)
    busy = [inst.busy_s for inst in instances.values()]
    return PolicyResult(policy, hits / max(1, total), _pct(ttfts, 50), _pct(ttfts, 99),
                        max(busy) / (sum(busy) / len(busy)),
                        [inst.num_requests for inst in instances.values()])


class _SimClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
