"""vLLM's own KV events into the router's index: real ZmqEventPublisher sockets on
127.0.0.1 (its PUB connecting to the subscriber's SUB, its replay ROUTER), real vLLM
KVEventBatch objects, the real router (ingestor, index, policy). No engine needed."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from typing import ClassVar

import msgspec
import pytest
import zmq

pytest.importorskip("vllm")
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from kvcluster.common.config import RouterConfig
from kvcluster.common.events import HashSettings, Tier
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from router import InProcessEventBus, Router, ViewState
from router.vllm_subscriber import VLLMEventSubscriber

SETTINGS = HashSettings("vllm-test", 16, 64)
"""Our chain steps every 16 tokens, one chunk key per 64."""
VLLM_BLOCK = 32
"""vLLM's block size in these events: 2 blocks per chunk, 2 of our steps per block."""
EXTRA = ExtraKeys("vllm-test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_hashes(tokens: list[int], block_size: int = VLLM_BLOCK, seed: bytes = b"vllm"):
    """vLLM-like chained block hashes (its own function and seed, not ours)."""
    parent, out = seed, []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + repr(tokens[start:start + block_size]).encode()).digest()
        out.append(parent)
    return out


def stored(tokens, start_block=0, block_size=VLLM_BLOCK, salt="", medium="GPU"):
    """vLLM's BlockStored for the blocks of ``tokens`` from ``start_block`` on."""
    hashes = _vllm_hashes(tokens, block_size)
    new = hashes[start_block:]
    return BlockStored(block_hashes=new,
                       parent_block_hash=hashes[start_block - 1] if start_block else None,
                       token_ids=tokens[start_block * block_size:len(hashes) * block_size],
                       block_size=block_size, lora_id=None, medium=medium, lora_name=None,
                       extra_keys=[(salt,) if salt and i == 0 and not start_block else None
                                   for i in range(len(new))])


def batch(*events) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


class Cluster:
    """A router, the subscriber feeding its bus, and vLLM publishers (one per instance)."""

    def __init__(self, subscriber_cls=VLLMEventSubscriber, **kwargs):
        self.router = Router(RouterConfig(heartbeat_ttl_s=30.0, silent_window_s=30.0),
                             SETTINGS, bus=InProcessEventBus())
        kwargs.setdefault("probe_interval_s", 0.2)
        self.sub = subscriber_cls(self.router.bus, SETTINGS, replay_timeout_s=0.5, **kwargs)
        self.publishers: dict[str, ZmqEventPublisher] = {}

    def engine(self, instance_id: str, watch: bool = True, **kwargs) -> ZmqEventPublisher:
        replay = f"tcp://127.0.0.1:{_free_port()}"
        pub = ZmqEventPublisher(0, endpoint=self.sub.endpoint, replay_endpoint=replay,
                                topic=instance_id, **kwargs)
        self.publishers[instance_id] = pub
        self.router.registry.register(instance_id)
        if watch:
            self.sub.watch(instance_id, replay)
        return pub

    def wait(self, condition, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.router.pump_events()
            if condition():
                return
            time.sleep(0.02)
        self.router.pump_events()
        assert condition(), "condition not reached in time"

    def held(self, instance_id: str, tier: Tier = Tier.DEVICE) -> set[int]:
        return self.router.index.blocks_of(instance_id, tier)

    def close(self) -> None:
        self.sub.close()
        for pub in self.publishers.values():
            pub.shutdown()


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def keys(tokens, salt="") -> list[int]:
    return [h.u64 for h in chunk_hashes(tokens, SETTINGS.block_size, SETTINGS.tokens_per_hash,
                                        ExtraKeys(SETTINGS.model_id, salt))]


PROMPT = list(range(1000, 1000 + 256))          # 4 chunks, 8 vLLM blocks
OTHER = list(range(5000, 5000 + 128))           # 2 chunks


def test_stored_blocks_route_the_prefix_to_its_instance(cluster):
    a = cluster.engine("a")
    b = cluster.engine("b")
    a.publish(batch(stored(PROMPT[:128])))                      # chunks 0-1
    a.publish(batch(stored(PROMPT[:256], start_block=4)))      # chunks 2-3, parent known
    b.publish(batch(stored(OTHER)))
    cluster.wait(lambda: len(cluster.held("a")) == 4 and len(cluster.held("b")) == 2)
    assert cluster.held("a") == set(keys(PROMPT))              # our chunk keys, exactly
    assert cluster.held("b") == set(keys(OTHER))
    follow_up = PROMPT + list(range(9000, 9100))
    decision = cluster.router.route(cluster.router.request_for(follow_up, EXTRA))
    assert (decision.instance_id, decision.matched_tokens) == ("a", 256)
    decision = cluster.router.route(cluster.router.request_for(OTHER + [1, 2, 3], EXTRA))
    assert decision.instance_id == "b"


def removed(tokens, indices, block_size=VLLM_BLOCK):
    hashes = _vllm_hashes(tokens, block_size)
    return BlockRemoved(block_hashes=[hashes[i] for i in indices], medium="GPU")


def connector_stored(chunk_keys, medium="CPU"):
    """kvcluster's connector's tier event in vLLM's stream (chunk keys, no tokens)."""
    return BlockStored(block_hashes=list(chunk_keys), parent_block_hash=None, token_ids=[],
                       block_size=SETTINGS.tokens_per_hash, lora_id=None, medium=medium,
                       lora_name=None, ownership="kvcluster")


def test_removed_and_cleared_blocks_leave_the_index(cluster):
    a = cluster.engine("a")
    k = keys(PROMPT)
    a.publish(batch(stored(PROMPT), connector_stored(k[:2])))
    cluster.wait(lambda: len(cluster.held("a")) == 4)
    assert cluster.held("a", Tier.HOST) == set(k[:2])
    a.publish(batch(removed(PROMPT, [5])))                         # vLLM block 5: chunk 2
    cluster.wait(lambda: len(cluster.held("a")) == 3)
    assert cluster.held("a") == {k[0], k[1], k[3]}
    decision = cluster.router.route(cluster.router.request_for(PROMPT, EXTRA))
    assert decision.matched_tokens == 128                          # the prefix stops at the hole
    a.publish(batch(AllBlocksCleared()))
    cluster.wait(lambda: not cluster.held("a"))
    assert cluster.held("a", Tier.HOST) == set(k[:2])              # the connector's tier stays


def test_batches_published_before_watch_are_replayed(cluster):
    a = cluster.engine("a", watch=False)
    a.publish(batch(stored(PROMPT[:128])))
    a.publish(batch(stored(PROMPT, start_block=4)))
    time.sleep(0.3)                                                # dropped: not watched yet
    cluster.router.pump_events()
    assert not cluster.held("a")
    cluster.sub.watch("a", a.get_publisher_config().replay_endpoint)
    cluster.wait(lambda: cluster.held("a") == set(keys(PROMPT)))


class LossySubscriber(VLLMEventSubscriber):
    """Loses the live messages whose (topic, seq) is listed: a transport gap."""

    drop: ClassVar[set] = set()

    def _on_message(self, frames):
        if (frames[0].decode(), int.from_bytes(frames[1], "big")) in self.drop:
            return
        super()._on_message(frames)


def _lossy(drop, **kwargs) -> Cluster:
    cls = type("Lossy", (LossySubscriber,), {"drop": set(drop)})
    return Cluster(cls, **kwargs)


def test_a_dropped_batch_is_recovered_through_replay():
    c = _lossy({("a", 1)}, probe_interval_s=60.0)                  # only the gap triggers replay
    try:
        a = c.engine("a")
        time.sleep(0.3)                                            # PUB's subscription arrives
        a.publish(batch(stored(PROMPT)))                           # seq 0
        a.publish(batch(removed(PROMPT, [7])))                     # seq 1: lost on the wire
        a.publish(batch(stored(OTHER)))                            # seq 2: reveals the gap
        k = keys(PROMPT)
        c.wait(lambda: c.held("a") == {*k[:3], *keys(OTHER)})
        assert c.sub.stats("a")["replays"] >= 1 and c.sub.stats("a").get("resets", 0) == 0
        assert c.router.status()["a"].state is ViewState.OK
    finally:
        c.close()


def test_a_gap_the_replay_buffer_lost_resets_the_view_loudly(caplog):
    c = _lossy({("a", 1), ("a", 2)}, probe_interval_s=60.0)
    try:
        a = c.engine("a", buffer_steps=2)
        time.sleep(0.3)
        a.publish(batch(stored(PROMPT[:128])))                     # seq 0: applied
        a.publish(batch(stored(OTHER)))                            # seq 1, 2: lost, and
        a.publish(batch(stored(PROMPT, start_block=4)))            #   gone from the buffer
        fresh = list(range(7000, 7064))
        a.publish(batch(stored(fresh)))                            # seq 3: reveals the gap
        with caplog.at_level(logging.ERROR, logger="router.vllm"):
            c.wait(lambda: c.sub.stats("a").get("resets", 0) == 1
                   and c.held("a") == set(keys(fresh)))
        assert any("lost and no longer in its replay buffer" in r.message for r in caplog.records
                   if r.levelno == logging.ERROR)
        # what the router claims is what the engine announced since: no stale prefix
        decision = c.router.route(c.router.request_for(PROMPT, EXTRA))
        assert decision.matched_tokens == 0
    finally:
        c.close()


def test_a_block_size_that_cannot_be_rehashed_is_flagged(cluster, caplog):
    a = cluster.engine("a")
    cluster.engine("b").publish(batch(stored(OTHER)))
    cluster.wait(lambda: cluster.held("b") == set(keys(OTHER)))
    with caplog.at_level(logging.ERROR):
        a.publish(batch(stored(PROMPT[:96], block_size=48)))       # 48 does not divide 64
        cluster.wait(lambda: cluster.router.status()["a"].state is ViewState.HASH_MISMATCH)
    assert any("does not divide" in r.message and r.levelno == logging.ERROR
               for r in caplog.records)
    view = cluster.router.status()["a"]
    assert "block_size 48 vs 16" in view.reason, view.reason
    a.publish(batch(stored(PROMPT)))                               # fine blocks: still refused
    cluster.wait(lambda: cluster.router.ingestor.views["a"].refused_batches >= 2)
    assert not cluster.held("a")
    decision = cluster.router.route(cluster.router.request_for(PROMPT, EXTRA))
    assert decision.instance_id == "b" and "a" in decision.excluded
    assert "hash_mismatch" in decision.excluded["a"]


def _raw_publisher(endpoint: str):
    """A bare XPUB connected to the subscriber, sending once its subscription arrived."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    assert sock.poll(5000), "the subscriber's subscription never arrived"
    sock.recv()
    return sock


def test_malformed_bytes_reset_the_instance_and_the_subscriber_keeps_serving(cluster, caplog):
    a = cluster.engine("a")
    cluster.sub.watch("raw")                                       # no replay endpoint
    cluster.router.registry.register("raw")
    raw = _raw_publisher(cluster.sub.endpoint)
    try:
        encode = msgspec.msgpack.Encoder().encode
        with caplog.at_level(logging.ERROR, logger="router.vllm"):
            raw.send_multipart([b"raw", (0).to_bytes(8, "big"), encode(batch(stored(OTHER)))])
            cluster.wait(lambda: cluster.held("raw") == set(keys(OTHER)))
            raw.send_multipart([b"raw", (1).to_bytes(8, "big"), b"\xc1 not msgpack"])
            raw.send_multipart([b"raw", b"short"])                 # 2 frames, 5-byte seq
            cluster.wait(lambda: not cluster.held("raw"))          # the view was reset
        errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
        assert any("undecodable" in m and "reset" in m for m in errors), errors
        assert any("malformed KV event message" in m for m in errors), errors
        raw.send_multipart([b"raw", (2).to_bytes(8, "big"), encode(batch(stored(PROMPT)))])
        a.publish(batch(stored(OTHER)))
        cluster.wait(lambda: cluster.held("raw") == set(keys(PROMPT))
                     and cluster.held("a") == set(keys(OTHER)))
        assert cluster.sub.stats("raw")["resets"] == 1
    finally:
        raw.close(0)


def test_an_unknown_parent_resets_the_view_loudly(cluster, caplog):
    a = cluster.engine("a")
    a.publish(batch(stored(OTHER)))
    cluster.wait(lambda: cluster.held("a") == set(keys(OTHER)))
    with caplog.at_level(logging.ERROR, logger="router.vllm"):
        a.publish(batch(stored(PROMPT, start_block=4)))            # parent never announced
        cluster.wait(lambda: cluster.sub.stats("a").get("resets", 0) == 1)
        cluster.wait(lambda: not cluster.held("a"))                # what it held is unknown now
    assert any("never announced" in r.message and "reset" in r.message for r in caplog.records)
    a.publish(batch(stored(PROMPT)))                               # new sequences still count
    cluster.wait(lambda: cluster.held("a") == set(keys(PROMPT)))
    assert cluster.sub.stats("a")["resets"] == 1


def test_resync_request_and_unwatch(cluster):
    a = cluster.engine("a")
    a.publish(batch(stored(PROMPT)))
    cluster.wait(lambda: len(cluster.held("a")) == 4)
    cluster.router.bus.request_resync("a")                          # the ingestor's ask
    cluster.wait(lambda: cluster.sub.stats("a").get("rebuilds", 0) >= 2)
    cluster.wait(lambda: cluster.held("a") == set(keys(PROMPT)))  # rebuilt from replay
    cluster.sub.unwatch("a")
    cluster.wait(lambda: not cluster.held("a"))
    a.publish(batch(stored(OTHER)))                                 # ignored now
    time.sleep(0.3)
    cluster.router.pump_events()
    assert not cluster.held("a")


def test_a_dead_replay_endpoint_is_reported_once_and_close_returns_promptly(caplog):
    c = Cluster()
    with caplog.at_level(logging.WARNING, logger="router.vllm"):
        c.sub.watch("ghost", f"tcp://127.0.0.1:{_free_port()}")    # nothing answers there
        time.sleep(1.3)                                            # watch + probes time out
    silent = [r for r in caplog.records if "no end marker" in r.message]
    assert len(silent) == 1 and silent[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if "subscriber error" in r.message]
    started = time.monotonic()
    c.close()
    assert time.monotonic() - started < 2.0
    with pytest.raises(RuntimeError):
        c.sub.watch("late")


def test_watch_refuses_what_cannot_be_a_topic_or_a_replay_address(cluster):
    with pytest.raises(ValueError, match="non-empty"):
        cluster.sub.watch("")
    with pytest.raises(ValueError, match="not a ZMQ address"):
        cluster.sub.watch("a", "127.0.0.1:5558")


def test_a_restarted_engine_is_rebuilt_from_its_new_stream(cluster):
    a = cluster.engine("a")
    replay = a.get_publisher_config().replay_endpoint
    a.publish(batch(stored(PROMPT)))
    a.publish(batch(stored(OTHER)))
    cluster.wait(lambda: len(cluster.held("a")) == 6)
    a.shutdown()                                                   # the engine dies ...
    restarted = _rebind(lambda: ZmqEventPublisher(0, endpoint=cluster.sub.endpoint,
                                                  replay_endpoint=replay, topic="a"))
    cluster.publishers["a"] = restarted                            # ... and comes back
    restarted.publish(batch(stored(OTHER)))                        # its seq 0, not ours
    # (its PUB may drop that batch before our subscription reaches it: the probe's
    # replay then finds the restart)
    cluster.wait(lambda: cluster.held("a") == set(keys(OTHER)))
    assert cluster.sub.stats("a")["rebuilds"] == 2


def _rebind(make, timeout_s: float = 3.0):
    """The dead engine's ROUTER frees its port asynchronously: retry the bind."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return make()
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_from_config_binds_the_configured_address():
    from kvcluster.common.config import ConfigError

    config = RouterConfig(vllm_events_bind=f"tcp://127.0.0.1:{_free_port()}",
                          vllm_probe_interval_s=0.5)
    config.validate("router")
    with VLLMEventSubscriber.from_config(InProcessEventBus(), SETTINGS, config) as sub:
        assert sub.endpoint == config.vllm_events_bind and sub.probe_interval_s == 0.5
    with pytest.raises(ConfigError, match="vllm_events_bind"):
        RouterConfig(vllm_events_bind="127.0.0.1:5557").validate("router")
