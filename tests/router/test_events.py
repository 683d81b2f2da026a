"""Publisher numbering, gap detection -> resync, mismatched and silent workers."""

import logging

import pytest

from kvcluster.common.events import (AllCleared, BlockRemoved, BlockStored, HashSettings,
                                     KVEventBatch, Tier)
from router import InProcessEventBus, KVEventPublisher, RouteRequest, Router, ViewState
from tests.router.conftest import SETTINGS


class DroppingBus(InProcessEventBus):
    """Loses the batches whose (instance, seq) is listed: a transport gap."""

    def __init__(self, drop: set[tuple[str, int]]):
        super().__init__()
        self.drop = drop

    def publish(self, batch: KVEventBatch) -> None:
        if (batch.instance_id, batch.seq) not in self.drop:
            super().publish(batch)


def _router(config, clock, bus=None) -> Router:
    return Router(config, SETTINGS, bus=bus or InProcessEventBus(), clock=clock)


def _held(router: Router, instance_id: str, tier=Tier.DEVICE) -> set[int]:
    return router.index.blocks_of(instance_id, tier)


def test_publisher_numbers_batches_and_tracks_a_snapshot():
    bus = InProcessEventBus()
    pub = KVEventPublisher("w", SETTINGS, bus, max_batch_events=2)
    pub.announce()
    pub.on_event(BlockStored((1, 2), Tier.DEVICE))
    pub.on_event(BlockStored((3,), Tier.HOST))          # size flush: batch 1
    pub.on_event(BlockRemoved((1,), Tier.DEVICE))
    assert pub.flush() == 1                             # batch 2
    assert pub.flush() == 0                             # nothing queued: no batch
    batches = bus.read()
    assert [b.seq for b in batches] == [0, 1, 2]
    assert batches[0].events == [AllCleared(None)] and batches[0].settings == SETTINGS
    assert [len(b.events) for b in batches[1:]] == [2, 1]
    assert pub.snapshot() == [BlockStored((2,), Tier.DEVICE), BlockStored((3,), Tier.HOST)]


def test_gap_triggers_resync_from_worker_snapshot(router_config, clock):
    bus = DroppingBus({("w", 2)})
    router = _router(router_config, clock, bus)
    router.registry.register("w")
    router.registry.register("v")
    pub = KVEventPublisher("w", SETTINGS, bus)
    other = KVEventPublisher("v", SETTINGS, bus)
    other.announce()
    pub.announce()                                                    # seq 0
    for seq_events in ([BlockStored((1, 2, 3), Tier.DEVICE)],         # seq 1
                       [BlockRemoved((3,), Tier.DEVICE)],             # seq 2: lost
                       [BlockStored((7,), Tier.DEVICE)]):             # seq 3: gap
        for e in seq_events:
            pub.on_event(e)
        pub.flush()
    router.pump_events()
    view = router.status()["w"]
    assert view.state is ViewState.RESYNCING and view.gaps == 1
    assert "expected seq 2, got 3" in view.reason
    decision = router.route(RouteRequest((1, 2, 3), 48))
    assert decision.instance_id == "v" and "resyncing" in decision.excluded["w"]
    assert pub.poll_resync() is True and pub.poll_resync() is False   # answered once
    router.pump_events()
    assert router.status()["w"].state is ViewState.OK
    assert _held(router, "w") == {1, 2, 7}                            # the worker's truth
    assert router.route(RouteRequest((1, 2, 3), 48)).instance_id == "w"


def test_unanswered_resync_is_requested_again(router_config, clock):
    bus = DroppingBus({("w", 0)})
    router = _router(router_config, clock, bus)
    pub = KVEventPublisher("w", SETTINGS, bus)
    pub.announce()
    pub.on_event(BlockStored((1,), Tier.DEVICE))
    pub.flush()
    router.pump_events()
    assert bus.take_resync_request("w")           # asked once; the worker "lost" it
    router.tick()
    assert not bus.take_resync_request("w")       # not yet overdue
    clock.advance(router_config.resync_timeout_s + 0.1)
    router.tick()
    assert bus.take_resync_request("w")


def test_duplicates_are_skipped_and_a_restarted_worker_resets(router_config, clock):
    bus = InProcessEventBus()
    router = _router(router_config, clock, bus)
    pub = KVEventPublisher("w", SETTINGS, bus)
    pub.announce()
    pub.on_event(BlockStored((1, 2), Tier.DEVICE))
    pub.flush()
    batches = bus.read()
    for b in batches + batches:                    # replayed twice
        router.ingestor.apply(b)
    assert router.ingestor.views["w"].next_seq == 2 and router.ingestor.views["w"].gaps == 0
    restarted = KVEventPublisher("w", SETTINGS, bus)   # seq back to 0
    restarted.announce()
    restarted.on_event(BlockStored((5,), Tier.DEVICE))
    restarted.flush()
    router.pump_events()
    assert _held(router, "w") == {5}
    assert router.status()["w"].state is ViewState.OK


def test_hash_settings_mismatch_is_reported_and_never_scored(router_config, clock, caplog):
    bus = InProcessEventBus()
    router = _router(router_config, clock, bus)
    router.registry.register("bad")
    bad = KVEventPublisher("bad", HashSettings("other-model", 16, 16), bus)
    bad.announce()
    bad.on_event(BlockStored((1, 2), Tier.DEVICE))
    bad.flush()
    with caplog.at_level(logging.ERROR, logger="router"):
        router.pump_events()
    view = router.status()["bad"]
    assert view.state is ViewState.HASH_MISMATCH
    assert "other-model" in view.reason and "test-model" in view.reason
    assert any("hash_mismatch" in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)
    assert router.index.num_blocks() == 0           # never applied
    decision = router.route(RouteRequest((1, 2), 32))   # only live instance: fallback
    assert decision.policy == "fallback" and decision.matched_blocks == 0
    assert "bad" in decision.excluded and "hash_mismatch" in decision.reason
    router.registry.register("good")
    good = KVEventPublisher("good", SETTINGS, bus)
    good.announce()
    router.pump_events()
    decision = router.route(RouteRequest((1, 2), 32))
    assert decision.instance_id == "good" and "hash_mismatch" in decision.excluded["bad"]


def test_worker_announcing_another_chunk_size_is_refused_loudly(router_config, clock, caplog):
    router = Router(router_config, HashSettings("test-model", 16, 64), clock=clock)
    router.registry.register("w256")
    router.registry.register("w64")
    wrong = KVEventPublisher("w256", HashSettings("test-model", 16, 256), router.bus)
    wrong.announce()
    wrong.on_event(BlockStored((1, 2), Tier.DEVICE))
    wrong.flush()
    KVEventPublisher("w64", HashSettings("test-model", 16, 64), router.bus).announce()
    with caplog.at_level(logging.ERROR, logger="router"):
        router.pump_events()
    view = router.status()["w256"]
    assert view.state is ViewState.HASH_MISMATCH and view.refused_batches == 2
    assert "tokens_per_hash 256 vs 64" in view.reason
    assert any("w256" in r.getMessage() and "tokens_per_hash" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    assert router.index.num_blocks("w256") == 0
    assert router.view_counts() == {"pending": 0, "ok": 1, "silent": 0, "hash_mismatch": 1,
                                    "resyncing": 0}
    decision = router.route(RouteRequest((1, 2), 128))
    assert decision.instance_id == "w64" and "tokens_per_hash" in decision.excluded["w256"]


def test_router_and_build_router_hash_as_the_settings_say():
    from kvcluster.common.config import ClusterConfig, RouterConfig
    from kvcluster.common.hashing import ExtraKeys, chunk_hashes
    from router import build_router

    settings = HashSettings("test-model", 16, 64)
    tokens, extra = list(range(130)), ExtraKeys("test-model")
    expected = tuple(k.u64 for k in chunk_hashes(tokens, 16, 64, extra))
    for router in (Router(RouterConfig(), settings), build_router(ClusterConfig(), settings)):
        assert router.tokens_per_hash == 64
        assert router.request_for(tokens, extra).block_hashes == expected
    with pytest.raises(ValueError, match="tokens_per_hash"):
        Router(RouterConfig(), HashSettings("test-model", 16, 0))


def test_silent_worker_is_flagged_after_the_window(router_config, clock, caplog):
    bus = InProcessEventBus()
    router = _router(router_config, clock, bus)
    router.registry.register("quiet")
    router.registry.register("talks")
    KVEventPublisher("talks", SETTINGS, bus).announce()
    router.pump_events()
    assert router.status()["quiet"].state is ViewState.PENDING
    clock.advance(router_config.silent_window_s + 0.5)
    router.registry.heartbeat("quiet")
    router.registry.heartbeat("talks")
    with caplog.at_level(logging.ERROR, logger="router"):
        view = router.status()["quiet"]
    assert view.state is ViewState.SILENT and "no KV events" in view.reason
    assert any("quiet" in r.getMessage() and "silent" in r.getMessage() for r in caplog.records)
    decisions = [router.route(RouteRequest((1,), 16)) for _ in range(3)]
    assert {d.instance_id for d in decisions} == {"talks"}
    assert "silent" in decisions[0].excluded["quiet"]
    KVEventPublisher("quiet", SETTINGS, bus).announce()   # wired up late: recovers
    router.pump_events()
    assert router.status()["quiet"].state is ViewState.OK


def test_router_thread_pumps_events(router_config):
    bus = InProcessEventBus()
    router = Router(router_config, SETTINGS, bus=bus)
    router.registry.register("w")
    pub = KVEventPublisher("w", SETTINGS, bus)
    router.start(poll_timeout_s=0.01)
    pub.start(flush_interval_s=0.005)
    try:
        pub.on_event(BlockStored((1, 2, 3), Tier.DEVICE))
        import time
        deadline = time.time() + 5
        while router.index.num_blocks("w") < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert router.route(RouteRequest((1, 2, 3), 48)).matched_blocks == 3
    finally:
        pub.stop()
        router.stop()


def test_request_for_matches_kvstore_chunk_keys(router_config, clock):
    from kvcluster.common.hashing import ExtraKeys, chunk_hashes

    settings = HashSettings("test-model", 16, 64)           # 4 blocks of 16 per chunk
    bus = InProcessEventBus()
    router = Router(router_config, settings, bus=bus, clock=clock)
    assert router.tokens_per_hash == 64
    router.registry.register("w")
    extra = ExtraKeys("test-model", tenant_salt="t1")
    tokens = list(range(200))                               # 3 full chunks
    keys = [k.u64 for k in chunk_hashes(tokens[:128], 16, 64, extra)]
    pub = KVEventPublisher("w", settings, bus)
    pub.announce()
    pub.on_event(BlockStored(tuple(keys), Tier.HOST))
    pub.flush()
    router.pump_events()
    request = router.request_for(tokens, extra)
    assert len(request.block_hashes) == 3 and request.num_tokens == 200
    decision = router.route(request)
    assert (decision.matched_blocks, decision.matched_tokens) == (2, 128)
    other_tenant = router.request_for(tokens, ExtraKeys("test-model", tenant_salt="t2"))
    assert router.route(other_tenant).matched_blocks == 0


def test_routing_threads_and_event_thread_run_concurrently(router_config):
    import threading
    import time

    bus = InProcessEventBus()
    router = Router(router_config, SETTINGS, bus=bus)
    pubs = [KVEventPublisher(f"w{i}", SETTINGS, bus) for i in range(4)]
    for pub in pubs:
        router.registry.register(pub.instance_id)
    router.start(poll_timeout_s=0.005)
    errors, stop = [], threading.Event()

    def route_loop(k):
        try:
            while not stop.is_set():
                router.route(RouteRequest(tuple(range(k, k + 8)), 128))
                router.registry.register(f"late-{k}")          # new views appear meanwhile
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=route_loop, args=(k,)) for k in range(3)]
    for pub in pubs:
        pub.announce()
    for t in threads:
        t.start()
    try:
        for n in range(200):
            pub = pubs[n % 4]
            pub.on_event(BlockStored((n,), Tier.DEVICE))
            pub.flush()
        deadline = time.time() + 5
        while router.index.num_blocks() < 200 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
        router.stop()
    assert not errors
    assert router.index.num_blocks() == 200
    assert {v.state for k, v in router.ingestor.views.items() if k.startswith("w")} == {ViewState.OK}


def test_first_batch_is_always_a_reset_so_silent_restarts_cannot_drift(router_config, clock):
    bus = InProcessEventBus()
    router = _router(router_config, clock, bus)
    first = KVEventPublisher("w", SETTINGS, bus)
    for h in (1, 2, 3):
        first.on_event(BlockStored((h,), Tier.DEVICE))
        first.flush()
    router.pump_events()
    assert router.ingestor.views["w"].next_seq == 3
    restarted = KVEventPublisher("w", SETTINGS, bus)      # never calls announce()
    restarted.on_event(BlockStored((9,), Tier.DEVICE))
    restarted.on_event(BlockRemoved((9,), Tier.DEVICE))
    restarted.on_event(BlockStored((8,), Tier.DEVICE))
    restarted.flush()
    batch = bus.read()[0]
    assert batch.seq == 0 and batch.events == [AllCleared(None), BlockStored((8,), Tier.DEVICE)]
    router.ingestor.apply(batch)
    assert _held(router, "w") == {8} and router.ingestor.views["w"].gaps == 0
