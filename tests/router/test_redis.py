"""Cluster mode on a real redis-server: streams, consumer groups, resync, TTL keys."""

import time

import pytest

from kvcluster.common.config import ClusterConfig, RouterConfig
from kvcluster.common.events import BlockRemoved, BlockStored, Tier
from router import KVEventPublisher, NoInstanceError, RouteRequest, Router, ViewState, build_router
from router.redis_bus import RedisStreamEventBus
from router.redis_registry import RedisRegistry
from tests.router.conftest import SETTINGS

pytestmark = pytest.mark.redis


def _client(url):
    import redis

    return redis.Redis.from_url(url)


def _router(url, group="r1", maxlen=100_000, ttl_s=5.0) -> Router:
    config = RouterConfig(heartbeat_ttl_s=ttl_s, resync_timeout_s=1.0)
    bus = RedisStreamEventBus(_client(url), "t", group, consumer=group, maxlen=maxlen)
    registry = RedisRegistry(_client(url), ttl_s, "t", refresh_s=0.05)
    return Router(config, SETTINGS, bus, registry)


def _drain(router: Router) -> int:
    total = 0
    while n := router.pump_events(max_batches=2):   # small pages exercise paging
        total += n
    return total


def _publish(pub: KVEventPublisher, *events):
    for e in events:
        pub.on_event(e)
    pub.flush()


def test_restarted_router_catches_up_from_its_consumer_group(redis_url):
    pub = KVEventPublisher("w", SETTINGS, RedisStreamEventBus(_client(redis_url), "t"))
    first = _router(redis_url)
    pub.announce()                                                   # seq 0
    _publish(pub, BlockStored((1, 2, 3), Tier.DEVICE))               # seq 1
    _publish(pub, BlockStored((4,), Tier.HOST))                      # seq 2
    assert _drain(first) == 3
    assert first.index.blocks_of("w", Tier.DEVICE) == {1, 2, 3}
    first.bus.close()                                                # router goes down
    _publish(pub, BlockRemoved((3,), Tier.DEVICE))                   # published meanwhile
    _publish(pub, BlockStored((5, 6), Tier.DEVICE))
    second = _router(redis_url)                                      # same group "r1"
    assert _drain(second) == 5                                       # 3 replayed + 2 new
    assert second.bus.replayed_batches == 3
    view = second.ingestor.views["w"]
    assert (view.state, view.gaps, view.next_seq) == (ViewState.OK, 0, 5)
    assert second.index.blocks_of("w", Tier.DEVICE) == {1, 2, 5, 6}
    assert second.index.blocks_of("w", Tier.HOST) == {4}
    assert not pub.poll_resync()                                     # no resync was needed
    _publish(pub, BlockStored((7,), Tier.DEVICE))                    # live again
    assert _drain(second) == 1 and 7 in second.index.blocks_of("w", Tier.DEVICE)
    pending = _client(redis_url).xpending("t:events", "r1")
    assert pending["pending"] == 0                                   # everything acked


def test_trimmed_history_shows_a_gap_and_resyncs_over_redis(redis_url):
    client = _client(redis_url)
    pub = KVEventPublisher("w", SETTINGS, RedisStreamEventBus(client, "t"))
    pub.announce()
    for h in range(10):
        _publish(pub, BlockStored((h,), Tier.DEVICE))
    _publish(pub, BlockRemoved((0,), Tier.DEVICE))
    client.xtrim("t:events", maxlen=3, approximate=False)            # history lost
    router = _router(redis_url, group="fresh")
    _drain(router)
    assert router.ingestor.views["w"].state is ViewState.RESYNCING
    assert client.exists("t:resync:w") == 1
    assert pub.poll_resync() is True                                 # DEL + snapshot
    _drain(router)
    assert router.ingestor.views["w"].state is ViewState.OK
    assert router.index.blocks_of("w", Tier.DEVICE) == set(range(1, 10))


def test_redis_registry_ttl_expiry_removes_instance_from_routing(redis_url):
    router = _router(redis_url, group="ttl", ttl_s=0.4)
    worker_side = RedisRegistry(_client(redis_url), 0.4, "t")
    bus = RedisStreamEventBus(_client(redis_url), "t")
    for i in ("a", "b"):
        worker_side.register(i, address=f"127.0.0.1:{i}")
        KVEventPublisher(i, SETTINGS, bus).announce()
    _drain(router)
    req = RouteRequest((1,), 16)
    assert {router.route(req).instance_id for _ in range(4)} == {"a", "b"}
    deadline = time.time() + 0.6
    while time.time() < deadline:                                    # only b keeps beating
        worker_side.heartbeat("b")
        time.sleep(0.05)
    assert {router.route(req).instance_id for _ in range(4)} == {"b"}
    assert _client(redis_url).exists("t:instance:a") == 0            # key expired in Redis
    time.sleep(0.5)
    with pytest.raises(NoInstanceError):
        router.route(req)


def test_build_router_cluster_mode(redis_url):
    config = ClusterConfig(redis_url=redis_url)
    router = build_router(config, SETTINGS)
    assert isinstance(router.bus, RedisStreamEventBus)
    assert isinstance(router.registry, RedisRegistry)
    router.registry.register("x")
    KVEventPublisher("x", SETTINGS, router.bus).announce()
    _drain(router)
    assert router.route(RouteRequest((), 1)).instance_id == "x"


def test_lost_stream_is_recreated(redis_url):
    client = _client(redis_url)
    router = _router(redis_url, group="lost")
    pub = KVEventPublisher("w", SETTINGS, RedisStreamEventBus(client, "t"))
    pub.announce()
    assert _drain(router) == 1
    client.flushall()                                                # Redis lost everything
    assert router.pump_events() == 0                                 # NOGROUP: recreate
    _publish(pub, BlockStored((3,), Tier.DEVICE))                    # seq 1 continues
    assert _drain(router) == 1
    assert router.index.blocks_of("w", Tier.DEVICE) == {3}
