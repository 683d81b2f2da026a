"""The trace replay used by bench.router, on a tiny synthetic trace."""

import json
import random

from bench.router_sim import LRUCache, SimParams, load_trace, replay_policy, replay_reference


def _trace(path, num_requests=300, num_prefixes=12, seed=0):
    rng = random.Random(seed)
    next_id = 10**6
    with open(path, "w") as f:
        for i in range(num_requests):
            prefix = rng.randrange(num_prefixes)
            ids = [prefix * 100 + k for k in range(8)]            # shared 8-block prefix
            ids += list(range(next_id, next_id + 2))              # 2 private blocks
            next_id += 2
            f.write(json.dumps({"timestamp": i * 50, "input_length": 512 * 10,
                                "output_length": 10, "hash_ids": ids}) + "\n")


def test_lru_cache_prefix_hits_and_eviction_order():
    cache = LRUCache(3)
    assert cache.admit((1, 2, 3)) == (0, [1, 2, 3], [])
    assert cache.admit((1, 2, 4)) == (2, [4], [3])
    assert cache.prefix_hits((2, 1)) == 2 and cache.prefix_hits((3,)) == 0


def test_kv_aware_beats_round_robin_on_shared_prefixes(tmp_path):
    path = tmp_path / "trace.jsonl"
    _trace(path)
    trace = load_trace(path)
    params = SimParams(num_instances=4, capacity_blocks=40)
    kv = replay_policy(trace, "kv_aware", params)
    rr = replay_policy(trace, "round_robin", params)
    infinite = replay_reference(trace, None)
    first_seen = len({r.block_hashes[0] for r in trace})       # each prefix misses once
    assert abs(infinite - (300 - first_seen) * 8 / 3000) < 1e-9
    assert kv.hit_ratio > 1.5 * rr.hit_ratio
    assert kv.hit_ratio <= infinite
    assert sum(kv.requests_per_instance) == 300 and kv.imbalance < 2.0
