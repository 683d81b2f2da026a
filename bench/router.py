"""Router benchmark: trace replay through the real router, and its speed.

    python -m bench.router [--quick] [--json FILE] [--trace PATH]

1. Replays a Mooncake-format trace against N simulated instances (LRU caches
   and FIFO prefill servers, see bench/router_sim.py) through the real router,
   index and KV events, once per policy; references in the same run: one
   global LRU with the total capacity, and an infinite cache.
2. Speed: event ingestion into the index, and routing-decision latency with
   1M indexed blocks across 64 instances.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from bench.common import parse_args, print_table, write_json
from bench.router_sim import (SETTINGS, SimParams, load_trace, replay_policy, replay_reference,
                              unique_blocks)
from kvcluster.common.config import RouterConfig
from kvcluster.common.events import BlockStored, KVEventBatch, Tier
from router import InProcessEventBus, KVEventPublisher, RouteRequest, Router
from router.policies import POLICIES

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "../shared/traces/mooncake_fast25_synthetic_trace.jsonl"


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_flags)
    results = {"quick": args.quick}
    results.update(run_replay(args))
    results.update(run_speed(args))
    _check_goals(results)
    write_json(args.json, results)
    return 0


def _extra_flags(parser) -> None:
    parser.add_argument("--trace", default=str(DEFAULT_TRACE), help="Mooncake-format JSONL")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--capacity-fraction", type=float, default=0.25,
                        help="total cache capacity as a fraction of the trace's unique blocks")


# ---------------------------------------------------------------- trace replay


def run_replay(args) -> dict:
    trace = load_trace(args.trace, limit=2000 if args.quick else None)
    unique = unique_blocks(trace)
    total_capacity = int(unique * args.capacity_fraction)
    params = SimParams(num_instances=args.instances,
                       capacity_blocks=max(1, total_capacity // args.instances))
    global_lru = replay_reference(trace, total_capacity)
    infinite = replay_reference(trace, None)
    by_policy = {name: replay_policy(trace, name, params) for name in POLICIES}
    rows = [[r.name, r.hit_ratio, r.ttft_p50_s, r.ttft_p99_s, r.imbalance]
            for r in by_policy.values()]
    rows += [["(global LRU)", global_lru, "-", "-", "-"], ["(infinite)", infinite, "-", "-", "-"]]
    print_table(f"{len(trace)} requests, {unique} unique blocks, {args.instances} instances x "
                f"{params.capacity_blocks} blocks",
                ["policy", "block hit ratio", "TTFT p50 s", "TTFT p99 s", "imbalance"], rows)
    kv, rr = by_policy["kv_aware"], by_policy["round_robin"]
    out = {"num_requests": len(trace), "unique_blocks": unique,
           "num_instances": args.instances, "capacity_blocks_per_instance": params.capacity_blocks,
           "kv_hit_ratio": kv.hit_ratio, "global_lru_hit_ratio": global_lru,
           "infinite_hit_ratio": infinite, "round_robin_hit_ratio": rr.hit_ratio,
           "kv_imbalance": kv.imbalance,
           "kv_vs_global_lru": kv.hit_ratio / max(global_lru, 1e-9),
           "kv_vs_round_robin": kv.hit_ratio / max(rr.hit_ratio, 1e-9)}
    for r in by_policy.values():
        out[f"policies.{r.name}"] = {"hit_ratio": r.hit_ratio, "ttft_p50_s": r.ttft_p50_s,
                                     "ttft_p99_s": r.ttft_p99_s, "imbalance": r.imbalance,
                                     "requests_per_instance": r.requests_per_instance}
    return out


# ---------------------------------------------------------------- speed


def run_speed(args, num_blocks: int = 1_000_000, num_instances: int = 64) -> dict:
    rng = random.Random(0)
    chains = _make_chains(rng, num_blocks)
    bus = InProcessEventBus()
    router = Router(RouterConfig(heartbeat_ttl_s=1e9, silent_window_s=1e9), SETTINGS, bus=bus)
    owners = _publish(rng, chains, bus, router, num_instances)
    t0 = time.perf_counter()
    while router.pump_events(max_batches=4096):
        pass
    ingest_s = time.perf_counter() - t0
    events = router.ingestor.block_events
    json_rate = _json_rate(chains[:2000], owners)
    lookups = _lookups(rng, chains, 2000 if args.quick else 20000)
    lat_us, cpu_us = _time_decisions(router, lookups)
    p50, p99 = _pct(lat_us, 50), _pct(lat_us, 99)
    cpu_p50, cpu_p99 = _pct(cpu_us, 50), _pct(cpu_us, 99)
    print_table(f"router speed: {router.index.num_blocks():,} indexed blocks, "
                f"{num_instances} instances",
                ["metric", "value"],
                [["ingestion, events/s (in-process)", events / ingest_s],
                 ["ingestion, events/s (JSON decode + apply)", json_rate],
                 ["decision p50, us (wall)", p50], ["decision p99, us (wall)", p99],
                 ["decision p50, us (CPU)", cpu_p50], ["decision p99, us (CPU)", cpu_p99],
                 ["lookups", len(lookups)]])
    return {"indexed_blocks": router.index.num_blocks(), "speed_instances": num_instances,
            "events_per_s": events / ingest_s, "events_per_s_json": json_rate,
            "decision_p50_us": p50, "decision_p99_us": p99,
            "decision_p50_cpu_us": cpu_p50, "decision_p99_cpu_us": cpu_p99,
            "mean_lookup_blocks": sum(len(q.block_hashes) for q in lookups) / len(lookups)}


def _make_chains(rng: random.Random, num_blocks: int) -> list[tuple[int, ...]]:
    """Prefix chains with trace-like lengths (512-token blocks) totalling num_blocks."""
    chains, total = [], 0
    while total < num_blocks:
        n = min(num_blocks - total, max(1, int(rng.expovariate(1 / 30))))
        chains.append(tuple(rng.getrandbits(64) for _ in range(n)))
        total += n
    return chains


def _publish(rng, chains, bus, router, num_instances) -> list[str]:
    pubs = []
    for i in range(num_instances):
        iid = f"inst-{i}"
        router.registry.register(iid)
        pub = KVEventPublisher(iid, SETTINGS, bus, max_batch_events=64)
        pub.announce()
        pubs.append(pub)
    owners = []
    for chain in chains:
        pub = pubs[rng.randrange(num_instances)]
        pub.on_event(BlockStored(chain, Tier.DEVICE if rng.random() < 0.7 else Tier.HOST))
        owners.append(pub.instance_id)
    for pub in pubs:
        pub.flush()
    return owners


def _json_rate(chains, owners) -> float:
    """Block events per second through KVEventBatch.from_json + index apply."""
    from router.index import KVIndex

    wires = [KVEventBatch(o, 0, SETTINGS, [BlockStored(c, Tier.DEVICE)]).to_json()
             for c, o in zip(chains, owners)]
    index = KVIndex()
    t0 = time.perf_counter()
    events = sum(index.apply(b.instance_id, b.events)
                 for b in map(KVEventBatch.from_json, wires))
    return events / (time.perf_counter() - t0)


def _lookups(rng, chains, n) -> list[RouteRequest]:
    """Half hit a stored prefix then diverge, a quarter are full hits, a quarter miss."""
    out = []
    for _ in range(n):
        chain = chains[rng.randrange(len(chains))]
        kind = rng.random()
        if kind < 0.5:
            cut = rng.randrange(len(chain) + 1)
            hashes = chain[:cut] + tuple(rng.getrandbits(64) for _ in range(rng.randrange(1, 30)))
        elif kind < 0.75:
            hashes = chain
        else:
            hashes = tuple(rng.getrandbits(64) for _ in range(len(chain)))
        out.append(RouteRequest(hashes, len(hashes) * SETTINGS.block_size))
    return out


def _time_decisions(router: Router, lookups) -> tuple[list[float], list[float]]:
    """Per-decision wall time and this thread's CPU time, in microseconds.

    CPU time excludes the time the OS ran other processes in between, which
    dominates the wall-clock tail on a shared machine.
    """
    for req in lookups[:200]:  # warm caches
        router.route(req)
    wall, cpu = [], []
    wall_ns, cpu_ns = time.perf_counter_ns, time.thread_time_ns
    for req in lookups:
        w0, c0 = wall_ns(), cpu_ns()
        router.route(req)
        c1, w1 = cpu_ns(), wall_ns()
        wall.append((w1 - w0) / 1000)
        cpu.append((c1 - c0) / 1000)
    return wall, cpu


def _pct(values, q) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _check_goals(r: dict) -> None:
    goals = [("kv_aware >= 0.9x global LRU hit ratio", r["kv_vs_global_lru"] >= 0.9),
             ("kv_aware >= 2x round_robin hit ratio", r["kv_vs_round_robin"] >= 2.0),
             ("kv_aware imbalance <= 1.5", r["kv_imbalance"] <= 1.5),
             ("decision p99 <= 200 us (wall)", r["decision_p99_us"] <= 200),
             ("decision p99 <= 200 us (CPU time)", r["decision_p99_cpu_us"] <= 200),
             ("ingestion >= 200k events/s", r["events_per_s"] >= 200_000)]
    print_table("goals", ["goal", "met"], [[g, "yes" if ok else "NO"] for g, ok in goals])
    r["goals_met"] = {g: ok for g, ok in goals}


if __name__ == "__main__":
    raise SystemExit(main())
