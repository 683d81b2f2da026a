"""Heartbeats with a TTL decide who may receive requests; loads feed the policies."""

import pytest

from kvcluster.common.config import RouterConfig
from router import (InMemoryRegistry, InProcessEventBus, InstanceLoad, KVEventPublisher,
                    NoInstanceError, RouteRequest, Router)
from tests.router.conftest import SETTINGS


def _router_with(ids, config, clock, policy="kv_aware"):
    config.policy = policy
    bus = InProcessEventBus()
    router = Router(config, SETTINGS, bus=bus, clock=clock)
    for i in ids:
        router.registry.register(i)
        KVEventPublisher(i, SETTINGS, bus).announce()
    router.pump_events()
    return router


def test_dead_instance_stops_receiving_requests_within_ttl(router_config, clock):
    router = _router_with(["a", "b"], router_config, clock, policy="round_robin")
    req = RouteRequest((1,), 16)
    assert {router.route(req).instance_id for _ in range(4)} == {"a", "b"}
    clock.advance(router_config.heartbeat_ttl_s - 1)
    router.registry.heartbeat("b")                       # a stops beating
    assert {router.route(req).instance_id for _ in range(4)} == {"a", "b"}
    clock.advance(1.01)                                  # a's last beat is now > TTL old
    assert {router.route(req).instance_id for _ in range(4)} == {"b"}
    clock.advance(router_config.heartbeat_ttl_s + 0.01)
    with pytest.raises(NoInstanceError, match="no live instance"):
        router.route(req)
    router.registry.heartbeat("a")                       # back from the dead
    assert router.route(req).instance_id == "a"


def test_heartbeat_loads_drive_least_loaded(router_config, clock):
    router = _router_with(["a", "b"], router_config, clock, policy="least_loaded")
    router.registry.heartbeat("a", InstanceLoad(queued_prefill_tokens=100))
    assert router.route(RouteRequest((), 8)).instance_id == "b"
    router.registry.heartbeat("b", InstanceLoad(queued_prefill_tokens=500))
    assert router.route(RouteRequest((), 8)).instance_id == "a"


def test_registry_caches_alive_list_until_something_changes(clock):
    reg = InMemoryRegistry(ttl_s=2.0, clock=clock)
    reg.register("x", address="127.0.0.1:1", role="prefill")
    first = reg.alive()
    assert reg.alive() is first and first[0].address == "127.0.0.1:1"
    reg.heartbeat("x", InstanceLoad(active_decode_requests=2))
    second = reg.alive()
    assert second is not first and second[0].load.active_decode_requests == 2
    assert second[0].role == "prefill"
    reg.deregister("x")
    assert reg.alive() == []


def test_registry_rejects_bad_ttl():
    with pytest.raises(ValueError, match="ttl_s"):
        InMemoryRegistry(ttl_s=0)


def test_heartbeater_keeps_an_instance_alive_until_stopped():
    import time

    from router import Heartbeater

    reg = InMemoryRegistry(ttl_s=0.3)
    beats = []

    def load():
        beats.append(1)
        return InstanceLoad(queued_prefill_tokens=len(beats))

    hb = Heartbeater(reg, "w", load, address="127.0.0.1:9", interval_s=0.05)
    hb.start()
    try:
        time.sleep(0.5)                       # longer than the TTL: only beats keep it
        alive = reg.alive()
        assert [i.instance_id for i in alive] == ["w"]
        assert alive[0].load.queued_prefill_tokens >= 3 and alive[0].address == "127.0.0.1:9"
    finally:
        hb.stop()
    assert reg.alive() == []
