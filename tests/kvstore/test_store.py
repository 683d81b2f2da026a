"""TieredStore behaviour on memory tiers: placement, eviction, promotion, pins,
events, metrics, async and threads."""

import asyncio
import random
import threading

import pytest
import torch

from kvcluster.common.events import AllCleared, BlockRemoved, BlockStored, Tier
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from tests.kvstore.helpers import CHUNK, LAYOUT, SPEC, build, make_keys, make_kv


def chunk(kv, i):
    return SPEC.tokens_view(kv, i)


def u64s(keys):
    return tuple(k.u64 for k in keys)


def test_put_get_roundtrip_and_prefix_lookup():
    store = build(device=4, host=4)
    keys, kv = make_keys(5), make_kv(5)
    assert store.put(keys[:3], kv[:, :, : 3 * 8]) == 3
    assert store.put(keys[:3], kv[:, :, : 3 * 8]) == 0  # already there
    num, tiers = store.lookup(keys)
    assert (num, tiers) == (3, [Tier.DEVICE] * 3)
    out = store.get(keys)
    assert out.shape == LAYOUT.shape(24)
    assert torch.equal(out, kv[:, :, :24])
    assert store.metrics.value("kvstore_hits_total", tier="device") == 3
    assert store.metrics.value("kvstore_misses_total") == 2
    # A gap: the prefix stops at the first missing chunk.
    store.remove([keys[1]])
    assert store.lookup(keys).num_chunks == 1
    assert torch.equal(store.get(keys), kv[:, :, :8])


def test_put_accepts_per_chunk_tensors_and_bytes():
    store = build(host=4)
    keys, kv = make_keys(2), make_kv(2)
    raw = chunk(kv, 1).contiguous().view(torch.uint8).numpy().tobytes()
    store.put(keys, [chunk(kv, 0), raw])
    assert torch.equal(store.get(keys), kv)
    with pytest.raises(ValueError, match="dtype"):
        store.put(keys, kv.float())
    with pytest.raises(ValueError, match="bytes"):
        store.put(keys[:1], [b"short"])


def test_get_into_preallocated_out():
    store = build(host=4)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys[:2], kv[:, :, :16])
    out = torch.zeros(LAYOUT.shape(24), dtype=torch.float16)
    got = store.get(keys, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == LAYOUT.shape(16)
    assert torch.equal(out[:, :, :16], kv[:, :, :16])
    with pytest.raises(ValueError, match="out must be"):
        store.get(keys, out=torch.zeros(LAYOUT.shape(24)))


def test_exact_eviction_and_spill_order_lru_with_events():
    store = build(device=2, host=2)
    events = []
    store.on_event.append(events.append)
    keys, kv = make_keys(5), make_kv(5)
    for i in range(5):
        store.put([keys[i]], [chunk(kv, i)])
    # device holds the 2 newest; host the next 2; the oldest was dropped.
    assert store.lookup(keys[::-1][:4]).tiers == [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.HOST]
    assert store.tier_of(keys[0]) is None
    k = [key.u64 for key in keys]
    assert events == [
        BlockStored((k[0],), Tier.DEVICE), BlockStored((k[1],), Tier.DEVICE),
        BlockRemoved((k[0],), Tier.DEVICE), BlockStored((k[0],), Tier.HOST),
        BlockStored((k[2],), Tier.DEVICE),
        BlockRemoved((k[1],), Tier.DEVICE), BlockStored((k[1],), Tier.HOST),
        BlockStored((k[3],), Tier.DEVICE),
        BlockRemoved((k[0],), Tier.HOST),  # dropped: no tier below host
        BlockRemoved((k[2],), Tier.DEVICE), BlockStored((k[2],), Tier.HOST),
        BlockStored((k[4],), Tier.DEVICE),
    ]
    assert store.metrics.value("kvstore_evictions_total", tier="device") == 3
    assert store.metrics.value("kvstore_dropped_total") == 1


def test_one_put_emits_one_stored_run_with_parent():
    store = build(host=8)
    events = []
    store.on_event.append(events.append)
    keys, kv = make_keys(4), make_kv(4)
    store.put(keys[:2], kv[:, :, :16])
    store.put(keys, kv)
    assert events == [
        BlockStored(u64s(keys[:2]), Tier.HOST, None),
        BlockStored(u64s(keys[2:]), Tier.HOST, keys[1].u64),
    ]
    store.remove(keys[2:])
    store.clear()
    assert events[2:] == [BlockRemoved(u64s(keys[2:]), Tier.HOST), AllCleared(None)]
    assert len(store) == 0 and store.snapshot_events() == []


def test_lru_touch_changes_victim():
    store = build(device=3)
    keys, kv = make_keys(4), make_kv(4)
    store.put(keys[:3], kv[:, :, :24])
    store.get(keys[:1])  # k0 used: k1 is now the oldest
    store.put(keys[3:], [chunk(kv, 3)])
    assert store.lookup(keys[1:2]).num_chunks == 0
    assert [store.tier_of(keys[i]) for i in (0, 2, 3)] == [Tier.DEVICE] * 3


def test_s3fifo_store_keeps_reused_chunk():
    store = build(device=4, policy="s3fifo")
    keys, kv = make_keys(8), make_kv(8)
    store.put(keys[:1], [chunk(kv, 0)])
    store.get(keys[:1])  # accessed once: survives a scan of one-off chunks
    for i in range(1, 8):
        store.put([keys[i]], [chunk(kv, i)])
    assert store.tier_of(keys[0]) == Tier.DEVICE
    assert torch.equal(store.get(keys[:1]), kv[:, :, :8])


def test_hit_below_promotes_to_top_and_spills_top_victim():
    store = build(device=1, host=3)
    events = []
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)
    assert store.lookup(keys).tiers == [Tier.HOST, Tier.DEVICE]
    store.on_event.append(events.append)
    assert torch.equal(store.get(keys[:1]), kv[:, :, :8])
    assert store.lookup(keys).tiers == [Tier.DEVICE, Tier.HOST]
    assert store.metrics.value("kvstore_promotions_total", tier="host") == 1
    k0, k1 = keys[0].u64, keys[1].u64
    assert events == [
        BlockRemoved((k1,), Tier.DEVICE), BlockStored((k1,), Tier.HOST),
        BlockRemoved((k0,), Tier.HOST), BlockStored((k0,), Tier.DEVICE),
    ]
    assert torch.equal(store.get(keys), kv)


def test_no_promotion_when_disabled():
    store = build(device=1, host=3, promote=False)
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)
    store.get(keys)
    assert store.lookup(keys).tiers == [Tier.HOST, Tier.DEVICE]


def test_prefetch_moves_prefix_to_device():
    store = build(device=3, host=3)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys, kv, tenant="t")
    store.put(make_keys(3, seed=9), make_kv(3, seed=9))  # pushes the first three to host
    assert store.lookup(keys).tiers == [Tier.HOST] * 3
    assert store.prefetch(keys).result(timeout=10) == 3
    assert store.lookup(keys).tiers == [Tier.DEVICE] * 3
    assert torch.equal(store.get(keys), kv)


def test_pinned_chunk_survives_pressure():
    store = build(device=2, host=1)
    keys, kv = make_keys(10), make_kv(10)
    store.put(keys[:1], [chunk(kv, 0)])
    with store.pinned(keys[:1]):
        assert store.pin_count(keys[0]) == 1
        for i in range(1, 10):
            store.put([keys[i]], [chunk(kv, i)])
            assert store.tier_of(keys[0]) == Tier.DEVICE
        assert store.remove(keys[:1]) == 0  # pinned: kept
    assert store.pin_count(keys[0]) == 0
    assert torch.equal(store.get(keys[:1]), kv[:, :, :8])
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin(keys[:1])


def test_all_pinned_tier_sends_new_chunk_down():
    store = build(device=1, host=1)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys[:1], [chunk(kv, 0)])
    store.pin(keys[:1])
    store.put(keys[1:2], [chunk(kv, 1)])
    assert store.lookup(keys[:2]).tiers == [Tier.DEVICE, Tier.HOST]
    store.pin(keys[1:2])
    assert store.put(keys[2:], [chunk(kv, 2)]) == 0  # nowhere to go
    assert store.tier_of(keys[2]) is None


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_capacities_never_exceeded_randomized(policy, tmp_path):
    rng = random.Random(7)
    store = build(device=3, host=4, disk=5, policy=policy, directory=tmp_path, max_pending_writes=2)
    pool_keys, pool_kv = make_keys(24, seed=3), make_kv(24, seed=3)
    pinned = []
    for step in range(250):
        op = rng.choice(["put", "put", "get", "get", "remove", "pin", "unpin", "prefetch"])
        i = rng.randrange(24)
        n = rng.randint(1, 4)
        keys = pool_keys[i : i + n]
        if op == "put":
            store.put(keys, [chunk(pool_kv, j) for j in range(i, i + len(keys))])
        elif op == "get":
            got = store.get(keys)
            m = got.shape[2] // 8
            assert torch.equal(got, pool_kv[:, :, i * 8 : (i + m) * 8]), step
        elif op == "remove":
            store.remove(keys)
        elif op == "pin" and len(pinned) < 3:
            store.pin(keys[:1])
            pinned.append(keys[0])
        elif op == "unpin" and pinned:
            store.unpin([pinned.pop(rng.randrange(len(pinned)))])
        elif op == "prefetch":
            store.prefetch(keys).result(timeout=10)
        _check_invariants(store)
    store.flush()
    _check_invariants(store)
    disk = store.tiers[2]
    on_disk = sum(p.stat().st_size for p in disk.root.glob("*.kvc"))
    assert on_disk <= disk.capacity_bytes
    assert {p.stem for p in disk.root.glob("*.kvc")} == {k.hex() for k in disk.keys()}
    store.close()


def _check_invariants(store):
    seen = {}
    for tier in store.tiers:
        assert tier.used_bytes <= tier.capacity_bytes, tier.name
        assert len(tier.policy) == len(tier)
        for d in tier.keys():
            assert d not in seen, "a chunk lives in one tier only"
            seen[d] = tier.kind
        if tier.peekable:
            assert tier.used_bytes == len(tier) * CHUNK
    assert seen == store._where


def test_aget_matches_get():
    store = build(host=4)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys, kv)

    async def main():
        return await asyncio.gather(store.aget(keys), store.aget(keys[:1]))

    full, first = asyncio.run(main())
    assert torch.equal(full, kv) and torch.equal(first, kv[:, :, :8])


def test_concurrent_puts_and_gets_return_exact_bytes():
    store = build(device=2, host=3)
    keys, kv = make_keys(12, seed=5), make_kv(12, seed=5)
    errors = []
    stop = threading.Event()

    def writer():
        rng = random.Random(1)
        while not stop.is_set():
            i = rng.randrange(12)
            store.put([keys[i]], [chunk(kv, i)])

    def reader():
        rng = random.Random(2)
        for _ in range(400):
            i = rng.randrange(10)
            got = store.get(keys[i : i + 3])
            m = got.shape[2] // 8
            if not torch.equal(got, kv[:, :, i * 8 : (i + m) * 8]):
                errors.append(i)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    threads[1].join()
    threads[2].join()
    stop.set()
    threads[0].join()
    assert errors == []


def test_subscriber_error_does_not_break_store():
    store = build(host=2)
    store.on_event.append(lambda e: 1 / 0)
    seen = []
    store.on_event.append(seen.append)
    keys, kv = make_keys(1), make_kv(1)
    assert store.put(keys, kv) == 1
    assert seen == [BlockStored(u64s(keys), Tier.HOST)]


def test_metrics_export_bytes_and_capacity():
    store = build(device=2, host=3)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys, kv)
    assert store.metrics.value("kvstore_bytes", tier="device") == 2 * CHUNK
    assert store.metrics.value("kvstore_bytes", tier="host") == CHUNK
    assert store.metrics.value("kvstore_capacity_bytes", tier="host") == 3 * CHUNK
    assert b"kvstore_spill_seconds_bucket" in store.metrics.exposition()


def test_engine_paged_cache_export_put_get_import_roundtrip():
    from kvcluster.engine.paged_cache import PagedKVCache

    cache = PagedKVCache(LAYOUT, num_blocks=8)
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=torch.Generator().manual_seed(4)))
    block_ids = [5, 2, 7, 0]  # 16 tokens = 2 chunks of 8
    exported = cache.export_blocks(block_ids)
    tokens = list(range(100, 116))
    keys = chunk_hashes(tokens, LAYOUT.block_size, SPEC.chunk_tokens, ExtraKeys("tiny"))
    store = build(device=1, host=2)
    store.put(keys, exported)
    other = PagedKVCache(LAYOUT, num_blocks=8)
    other.import_blocks([1, 3, 4, 6], store.get(keys))
    assert torch.equal(other.export_blocks([1, 3, 4, 6]), exported)
