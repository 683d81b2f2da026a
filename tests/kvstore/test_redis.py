"""Redis tier against a real redis-server, including a restart mid-test."""

import logging
import time

import pytest
import redis
import torch

from kvcluster.common.events import AllCleared, BlockRemoved, Tier
from tests.kvstore.helpers import SPEC, build, make_keys, make_kv

pytestmark = pytest.mark.redis


def chunk(kv, i):
    return SPEC.tokens_view(kv, i)


def test_spill_to_redis_and_back_namespaced_with_ttl(redis_server):
    store = build(host=1, redis=4, redis_url=redis_server.url)
    keys, kv = make_keys(3, tenant="acme"), make_kv(3)
    store.put(keys, kv, tenant="acme")
    assert store.lookup(keys).tiers == [Tier.REDIS, Tier.REDIS, Tier.HOST]
    client = redis.Redis.from_url(redis_server.url)
    names = sorted(n.decode() for n in client.keys("*"))
    fp = f"{SPEC.layout.fingerprint:016x}"
    assert names == sorted(f"kvc:tiny:acme:{fp}:{k.hex()}" for k in keys[:2])
    assert 0 < client.pttl(names[0]) <= 3600 * 1000
    assert torch.equal(store.get(keys), kv)  # MGET of both, promoted to host one by one
    assert store.metrics.value("kvstore_hits_total", tier="redis") == 2
    store.close()


def test_redis_restart_disables_tier_then_recovers(redis_server, caplog):
    store = build(host=1, redis=4, redis_url=redis_server.url)
    events = []
    store.on_event.append(events.append)
    keys, kv = make_keys(6), make_kv(6)
    store.put(keys[:3], kv[:, :, :24])
    assert store.lookup(keys[:3]).tiers == [Tier.REDIS, Tier.REDIS, Tier.HOST]
    redis_tier = store.tiers[1]

    redis_server.stop()
    with caplog.at_level(logging.WARNING):
        got = store.get(keys[:3])  # Redis is gone: a miss, not an exception
    assert got.shape[2] == 0
    assert "Redis unreachable" in caplog.text
    assert not redis_tier.is_up and len(redis_tier) == 0
    assert store.lookup(keys[:3]).num_chunks == 0 and store.tier_of(keys[2]) == Tier.HOST
    assert BlockRemoved((keys[0].u64, keys[1].u64), Tier.REDIS) in events
    assert store.metrics.value("kvstore_tier_available", tier="redis") == 0
    # While down, spills past the host tier are dropped, nothing raises.
    store.put(keys[3:4], [chunk(kv, 3)])
    assert store.tier_of(keys[2]) is None and store.tier_of(keys[3]) == Tier.HOST

    redis_server.start()  # same port, empty server
    time.sleep(0.3)  # > retry_after_s
    store.put(keys[4:6], kv[:, :, 32:48])
    assert redis_tier.is_up
    assert store.lookup(keys[3:6]).tiers == [Tier.REDIS, Tier.REDIS, Tier.HOST]
    assert torch.equal(store.get(keys[3:6]), kv[:, :, 24:48])
    assert store.metrics.value("kvstore_tier_available", tier="redis") == 1
    store.clear()
    assert events[-1] == AllCleared(None)
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0
    store.close()


def test_expired_chunk_is_reported_lost(redis_server):
    store = build(host=1, redis=4, redis_url=redis_server.url)
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)
    redis.Redis.from_url(redis_server.url).flushall()  # as if the TTL ran out
    assert store.get(keys[:1]).shape[2] == 0
    assert store.tier_of(keys[0]) is None
    assert store.metrics.value("kvstore_lost_total", tier="redis", reason="expired") == 1
    store.close()


def test_a_new_store_indexes_what_an_earlier_run_left_in_redis(redis_server):
    keys, kv = make_keys(4, tenant="acme"), make_kv(4)
    first = build(host=1, redis=4, redis_url=redis_server.url)
    first.put(keys, kv, tenant="acme")  # 3 spill to Redis, 1 stays in host memory
    assert first.lookup(keys[:3]).tiers == [Tier.REDIS] * 3
    first.close()  # the worker restarts; Redis keeps the chunks
    client = redis.Redis.from_url(redis_server.url)
    client.set("kvc:tiny:acme:0123456789abcdef:" + "ab" * 32, b"another layout")
    client.set("kvc:tiny:acme:not-a-chunk", b"x")

    second = build(host=1, redis=4, redis_url=redis_server.url)
    assert second.lookup(keys).tiers == [Tier.REDIS] * 3  # the 4th lived only in memory
    assert torch.equal(second.get(keys[:3]), kv[:, :, :24])
    second.close()


def test_indexing_existing_chunks_stops_at_the_capacity_oldest_first(redis_server):
    keys, kv = make_keys(3), make_kv(3)
    first = build(host=1, redis=4, redis_url=redis_server.url)
    first.put(keys, kv)
    first.close()
    client = redis.Redis.from_url(redis_server.url)
    names = {k: first.tiers[1].name_of(k) for k in keys[:2]}
    client.pexpire(names[keys[1]], 1_000_000)  # expires sooner: the older one
    second = build(host=1, redis=1, redis_url=redis_server.url)
    assert second.tier_of(keys[1]) == Tier.REDIS and second.tier_of(keys[0]) is None
    second.close()
