"""Exact decisions per policy on constructed index states and loads."""

from collections import Counter

import pytest

from kvcluster.common.config import RouterConfig
from kvcluster.common.events import BlockStored, Tier
from router.decision import Candidates, RouteRequest
from router.index import KVIndex
from router.load import InstanceLoad
from router.policies import (KVAwarePolicy, LeastLoadedPolicy, PrefixOnlyPolicy,
                             RoundRobinPolicy, make_policy)

BLOCK = 16


def _cfg(**kwargs) -> RouterConfig:
    """overlap_weight 1: the kv_aware cost is exactly the estimated TTFT in ms."""
    return RouterConfig(**{"overlap_weight": 1.0, **kwargs})


def _state(holdings: dict[str, list[BlockStored]], loads: dict[str, InstanceLoad],
           chain) -> Candidates:
    index = KVIndex(max_instances=8)
    for instance_id, events in holdings.items():
        index.apply(instance_id, events)
    ids = sorted(loads)
    slots = [index.slot(i) for i in ids]
    cands = Candidates(ids, [loads[i] for i in ids], slots, BLOCK)
    cands.match = index.match(chain, index.slot_mask(slots))
    return cands


def _dev(*hashes, tier=Tier.DEVICE):
    return [BlockStored(tuple(hashes), tier)]


CHAIN = (1, 2, 3, 4, 5, 6)
REQ = RouteRequest(CHAIN, num_tokens=100)  # 6 full blocks + 4 tokens


def test_kv_aware_prefers_the_cached_prefix_when_idle():
    cands = _state({"a": _dev(1, 2, 3, 4), "b": _dev(1)},
                   {"a": InstanceLoad(), "b": InstanceLoad(), "c": InstanceLoad()}, CHAIN)
    d = KVAwarePolicy(_cfg()).choose(REQ, cands)
    assert d.instance_ids == ["a", "b", "c"]
    assert (d.matched_blocks, d.matched_tokens, d.policy) == (4, 64, "kv_aware")
    assert "4/6 blocks cached" in d.reason


def test_kv_aware_trades_hits_against_queued_work():
    # ms/token = 0.1: a costs 0.1*(100-64) + 0.1*1000 = 103.6 ms, b costs 10 ms
    loads = {"a": InstanceLoad(queued_prefill_tokens=1000), "b": InstanceLoad()}
    cands = _state({"a": _dev(1, 2, 3, 4)}, loads, CHAIN)
    d = KVAwarePolicy(_cfg()).choose(REQ, cands)
    assert d.instance_id == "b" and d.matched_blocks == 0
    # 50 queued tokens: a costs 3.6 + 5 = 8.6 ms < 10 ms
    loads["a"] = InstanceLoad(queued_prefill_tokens=50)
    d = KVAwarePolicy(_cfg()).choose(REQ, _state({"a": _dev(1, 2, 3, 4)}, loads, CHAIN))
    assert d.instance_id == "a"


def test_overlap_weight_values_cache_affinity():
    # a: 4 cached blocks, 100 queued tokens; b: idle, no hit (10 ms)
    loads = {"a": InstanceLoad(queued_prefill_tokens=100), "b": InstanceLoad()}
    holdings = {"a": _dev(1, 2, 3, 4)}
    # w=1: a = 10 - 6.4 + 10 = 13.6 ms; w=2: a = 10 - 12.8 + 10 = 7.2 ms
    assert KVAwarePolicy(_cfg()).choose(REQ, _state(holdings, loads, CHAIN)).instance_id == "b"
    two = _cfg(overlap_weight=2.0)
    assert KVAwarePolicy(two).choose(REQ, _state(holdings, loads, CHAIN)).instance_id == "a"


def test_kv_aware_weighs_hits_by_tier_transfer_time():
    holdings = {"a": _dev(1, 2, 3, 4, tier=Tier.DISK), "b": _dev(1, 2)}
    loads = {"a": InstanceLoad(), "b": InstanceLoad()}
    # disk at 0.46 GB/s with 46080 B/token: 0.1 ms/token, as slow as recomputing
    slow = _cfg(kv_bytes_per_token=46080, tier_gbps=[0.0, 10.0, 0.4608, 1.0])
    assert KVAwarePolicy(slow).choose(REQ, _state(holdings, loads, CHAIN)).instance_id == "b"
    fast = _cfg(kv_bytes_per_token=46080, tier_gbps=[0.0, 10.0, 20.0, 1.0])
    assert KVAwarePolicy(fast).choose(REQ, _state(holdings, loads, CHAIN)).instance_id == "a"


def test_kv_aware_decode_and_memory_terms():
    loads = {"a": InstanceLoad(active_decode_requests=3),
             "b": InstanceLoad(kv_used_bytes=1, kv_capacity_bytes=4)}
    cfg = _cfg(decode_request_ms=1.0, kv_memory_ms=10.0)  # a +3 ms, b +2.5 ms
    assert KVAwarePolicy(cfg).choose(REQ, _state({}, loads, CHAIN)).instance_id == "b"
    cfg = _cfg(decode_request_ms=0.5, kv_memory_ms=10.0)  # a +1.5 ms
    assert KVAwarePolicy(cfg).choose(REQ, _state({}, loads, CHAIN)).instance_id == "a"


def test_kv_aware_ties_rotate_and_softmax_samples_by_cost():
    loads = {"a": InstanceLoad(), "b": InstanceLoad()}
    policy = KVAwarePolicy(_cfg())
    picks = [policy.choose(REQ, _state({}, loads, CHAIN)).instance_id for _ in range(4)]
    assert sorted(Counter(picks).values()) == [2, 2]
    hot = KVAwarePolicy(_cfg(temperature=0.5, seed=7))
    cands = _state({"a": _dev(1, 2, 3, 4)}, loads, CHAIN)
    counts = Counter(hot.choose(REQ, cands).instance_id for _ in range(1000))
    # normalised costs 0 and 1 at T=0.5: p(b) = e^-2 / (1 + e^-2) ~ 0.12
    assert 60 < counts["b"] < 190 and counts["a"] + counts["b"] == 1000


def test_round_robin_cycles_in_id_order():
    loads = {i: InstanceLoad() for i in "cab"}
    policy = RoundRobinPolicy()
    cands = _state({"b": _dev(1, 2)}, loads, CHAIN)
    decisions = [policy.choose(REQ, cands) for _ in range(4)]
    assert [d.instance_id for d in decisions] == ["a", "b", "c", "a"]
    assert [d.matched_blocks for d in decisions] == [0, 2, 0, 0]


def test_least_loaded_orders_by_queue_then_decodes():
    loads = {"a": InstanceLoad(queued_prefill_tokens=10),
             "b": InstanceLoad(queued_prefill_tokens=5, active_decode_requests=4),
             "c": InstanceLoad(queued_prefill_tokens=5, active_decode_requests=1)}
    d = LeastLoadedPolicy().choose(REQ, _state({"a": _dev(1, 2, 3)}, loads, CHAIN))
    assert d.instance_ids == ["c", "b", "a"] and d.matched_blocks == 0


def test_prefix_only_ignores_load():
    loads = {"a": InstanceLoad(queued_prefill_tokens=10**6), "b": InstanceLoad()}
    d = PrefixOnlyPolicy().choose(REQ, _state({"a": _dev(1, 2, 3)}, loads, CHAIN))
    assert (d.instance_id, d.matched_blocks, d.matched_tokens) == ("a", 3, 48)


@pytest.mark.parametrize("name, cls", [("kv_aware", KVAwarePolicy),
                                       ("round_robin", RoundRobinPolicy),
                                       ("least_loaded", LeastLoadedPolicy),
                                       ("prefix_only", PrefixOnlyPolicy)])
def test_factory_by_name(name, cls):
    assert type(make_policy(RouterConfig(policy=name))) is cls


def test_factory_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy(RouterConfig(policy="random"))


@pytest.mark.parametrize("section, field", [
    ({"tier_gbps": [1.0, 2.0]}, "router.tier_gbps"),
    ({"temperature": -1.0}, "router.temperature"),
    ({"overlap_weight": -0.5}, "router.overlap_weight"),
    ({"policy": "random"}, "router.policy"),
    ({"silent_window_s": 0}, "router.silent_window_s"),
])
def test_router_config_errors_name_the_field(section, field):
    from kvcluster.common.config import ClusterConfig, ConfigError, from_dict

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(ClusterConfig, {"router": section})
