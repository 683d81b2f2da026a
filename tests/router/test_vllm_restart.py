"""A vLLM engine that restarts on a new replay address (a Ray actor restarted: a new
process, a new free port, its sequence numbers from 0, an empty prefix cache): real
ZmqEventPublisher sockets on 127.0.0.1, the real router. No engine needed."""

from __future__ import annotations

import logging
import time

import pytest

pytest.importorskip("vllm")
from vllm.distributed.kv_events import ZmqEventPublisher

from router import ViewState
from tests.router.test_vllm_events import (
    EXTRA,
    OTHER,
    PROMPT,
    Cluster,
    _free_port,
    batch,
    keys,
    stored,
)

FRESH = list(range(7000, 7000 + 64))  # 1 chunk


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def _old_engine(cluster: Cluster) -> None:
    """Engine "a" publishes PROMPT and OTHER (seq 0, 1, 2), is seen, then dies."""
    a = cluster.engine("a")
    a.publish(batch(stored(PROMPT[:128])))
    a.publish(batch(stored(PROMPT, start_block=4)))
    a.publish(batch(stored(OTHER)))
    cluster.wait(lambda: cluster.held("a") == {*keys(PROMPT), *keys(OTHER)})
    a.shutdown()


def _restarted_engine(cluster: Cluster) -> tuple[ZmqEventPublisher, str]:
    """Engine "a" again, its replay ROUTER on another port (as a restarted actor's)."""
    replay = f"tcp://127.0.0.1:{_free_port()}"
    pub = ZmqEventPublisher(0, endpoint=cluster.sub.endpoint, replay_endpoint=replay,
                            topic="a")
    cluster.publishers["a"] = pub
    return pub, replay


def test_rewatching_on_a_new_replay_address_drops_the_dead_engines_blocks(cluster):
    """watch() with the restarted engine's replay address: what the dead engine held is
    cleared at once (before the new one publishes anything), and the new engine's
    batches from its seq 0 are applied in order, none lost, no reset."""
    _old_engine(cluster)
    restarted, replay = _restarted_engine(cluster)
    cluster.sub.watch("a", replay)
    cluster.wait(lambda: not cluster.held("a"))
    decision = cluster.router.route(cluster.router.request_for(PROMPT, EXTRA))
    assert decision.matched_tokens == 0                            # no stale claim
    restarted.publish(batch(stored(FRESH)))                        # its seq 0
    restarted.publish(batch(stored(PROMPT[:128])))                 # its seq 1
    cluster.wait(lambda: cluster.held("a") == {*keys(FRESH), *keys(PROMPT[:128])})
    decision = cluster.router.route(cluster.router.request_for(PROMPT, EXTRA))
    assert (decision.instance_id, decision.matched_tokens) == ("a", 128)
    stats = cluster.sub.stats("a")
    assert stats.get("resets", 0) == 0 and stats["batches"] == 2
    assert cluster.router.status()["a"].state is ViewState.OK


def test_a_restart_seen_before_the_rewatch_rebuilds_once_and_does_not_stall(cluster, caplog):
    """The new engine's seq 0 arrives while the subscriber still has the dead replay
    address: the view is rebuilt (the dead engine's blocks dropped, the batch applied,
    not taken for a duplicate), said once at ERROR that the replay address is stale,
    and later batches apply in order without resetting again or waiting on the dead
    address each time. The re-watch then rebuilds from the new replay buffer."""
    _old_engine(cluster)
    restarted, replay = _restarted_engine(cluster)
    with caplog.at_level(logging.WARNING, logger="router.vllm"):
        time.sleep(1.0)                                            # its PUB connects
        restarted.publish(batch(stored(FRESH)))                    # seq 0 < expected 3
        cluster.wait(lambda: cluster.held("a") == set(keys(FRESH)))
        rebuilds = cluster.sub.stats("a")["rebuilds"]
        began = time.monotonic()
        for i in range(1, 6):                                      # seq 1..5, in order
            restarted.publish(batch(stored(list(range(20_000 * i, 20_000 * i + 64)))))
        cluster.wait(lambda: len(cluster.held("a")) == 6)
        assert time.monotonic() - began < 2.0                      # not 0.5 s per batch
        time.sleep(0.6)                                            # a few probe intervals
        cluster.router.pump_events()
    stats = cluster.sub.stats("a")
    assert stats["rebuilds"] == rebuilds and stats.get("resets", 0) == 0
    assert len(cluster.held("a")) == 6
    stale = [r for r in caplog.records if "stale" in r.message]
    assert len(stale) == 1 and stale[0].levelno == logging.ERROR, stale
    assert "watch" in stale[0].message
    cluster.sub.watch("a", replay)                                 # the backend re-watches
    cluster.wait(lambda: cluster.sub.stats("a").get("batches", 0) == 6)
    assert len(cluster.held("a")) == 6 and cluster.sub.stats("a").get("resets", 0) == 0
    assert cluster.router.status()["a"].state is ViewState.OK


def test_an_engine_that_published_once_then_restarted_is_not_taken_for_the_same(cluster):
    """The dead engine had published only its seq 0; the new engine's seq 0 differs:
    the dead engine's block must not stay claimed beside the new one's."""
    a = cluster.engine("a")
    a.publish(batch(stored(OTHER)))
    cluster.wait(lambda: cluster.held("a") == set(keys(OTHER)))
    a.shutdown()
    restarted, _ = _restarted_engine(cluster)
    time.sleep(1.0)                                                # its PUB connects
    restarted.publish(batch(stored(FRESH)))                        # its seq 0 as well
    cluster.wait(lambda: cluster.held("a") == set(keys(FRESH)))
