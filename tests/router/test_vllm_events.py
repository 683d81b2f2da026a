"""vLLM's own KV events into the router's index: real ZmqEventPublisher sockets on
127.0.0.1 (its PUB connecting to the subscriber's SUB, its replay ROUTER), real vLLM
KVEventBatch objects, the real router (ingestor, index, policy). No engine needed."""

from __future__ import annotations

import hashlib
import logging
import socket
import time

import msgspec
import pytest
import zmq

pytest.importorskip("vllm")
from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,  # noqa: E402
                                        KVEventBatch, ZmqEventPublisher)

from kvcluster.common.config import RouterConfig  # noqa: E402
from kvcluster.common.events import HashSettings, Tier  # noqa: E402
from kvcluster.common.hashing import ExtraKeys, chunk_hashes  # noqa: E402
from router import InProcessEventBus, Router, ViewState  # noqa: E402
from router.vllm_subscriber import VLLMEventSubscriber  # noqa: E402

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
        for pub in self.publishers.values():
            pub.shutdown()
        self.sub.close()


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
