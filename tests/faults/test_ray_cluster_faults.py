"""Faults in the whole running system: Ray actors, gRPC front end, Redis, disk tier.

One cluster for the module, in cluster mode (``redis_url``: event streams,
registry and a Redis kvstore tier on our own redis-server) when redis-server is
installed, else the embedded default (the Redis test then skips). Each worker's
store has only a disk tier (device and host tiers off), so every cached chunk
is a real file. Tests run in order, the most destructive last:

1. a chunk file is corrupted under a running worker  -> detected, recomputed
2. redis-server restarts under load                   -> served, view recovers
3. kill -9 of a decode actor's process mid-stream     -> resumed, same tokens
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from kvcluster.client import KVClusterClient, TokenEvent
from kvcluster.client.sync_client import GenerateError
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.runtime.launcher import ClusterThread
from kvstore.tiers.disk_format import HEADER_SIZE, ChunkHeader, checksum
from router.kv_view import ViewState
from tests.faults.conftest import reference_tokens
from tests.kvstore.helpers import RedisServer
from tests.workers.conftest import tiny_config

ray = pytest.importorskip("ray")

DOC = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 byte tokens


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("disk")


@pytest.fixture(scope="module")
def config(tiny_model, redis_server, disk_dir):
    store = {"device": {"enabled": False}, "host": {"enabled": False},
             "disk": {"enabled": True, "directory": str(disk_dir), "capacity_bytes": 8 << 20}}
    extra = {}
    if redis_server is not None:
        store["redis"] = {"enabled": True, "url": redis_server.url[:-1] + "1",
                          "retry_after_s": 0.5, "socket_timeout_s": 0.5}
        extra["redis_url"] = redis_server.url
    cfg = tiny_config(tiny_model, store=store,
                      workers={"num_prefill": 1, "num_decode": 2},
                      router={"heartbeat_ttl_s": 4.0, "port": 0, "silent_window_s": 30.0,
                              "resync_timeout_s": 1.0})
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def cluster(config):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    yield handle
    handle.close()
    ray.shutdown()


def _expected(config, prompt: str, max_new_tokens: int) -> list[int]:
    ids = Tokenizer.from_pretrained(config.model.path).encode(prompt)
    return reference_tokens(config, ids, SamplingParams(max_new_tokens=max_new_tokens),
                            stop_on_eos=True)


def _generate(cluster, prompt: str, max_new_tokens: int = 6, timeout_s: float = 60):
    with KVClusterClient(cluster.address) as client:
        return client.generate(prompt, params=SamplingParams(max_new_tokens=max_new_tokens),
                               timeout_s=timeout_s)


def _chunk_files(disk_dir: Path, instance_id: str) -> list[Path]:
    return sorted((disk_dir / instance_id).glob("*/*.kvc"))


def _valid(path: Path) -> bool:
    data = path.read_bytes()
    try:
        header = ChunkHeader.unpack(data)
    except ValueError:
        return False
    return len(data) == header.file_size and \
        checksum(data[HEADER_SIZE:]) == header.payload_checksum


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---------------------------------------------------------------- 1. corrupt chunk


def test_corrupted_chunk_file_is_detected_never_served_and_recomputed(cluster, config, disk_dir):
    prompt = DOC + "Corrupt me?"
    expected = _expected(config, prompt, 6)
    first = _generate(cluster, prompt)
    assert list(first.token_ids) == expected[:len(first.token_ids)]
    holder = first.final.decode_instance
    _wait_for(lambda: len(_chunk_files(disk_dir, holder)) >= 8, 20, "decode chunks on disk")
    corrupted = {}
    for instance in ("prefill-0", "decode-0", "decode-1"):  # every copy, every tier file
        for path in _chunk_files(disk_dir, instance):
            data = bytearray(path.read_bytes())
            data[HEADER_SIZE + len(data[HEADER_SIZE:]) // 2] ^= 0x40
            with open(path, "r+b") as f:  # in place: the running worker keeps its index
                f.write(data)
            corrupted[path] = bytes(data)
    for handle in cluster.cluster.pools.decode:  # engines' own blocks gone: read the disk
        ray.get(handle.actor.__ray_call__.remote(
            lambda actor: actor.worker.engine.blocks.reset_prefix_cache()), timeout=10)
    second = _generate(cluster, prompt)
    assert list(second.token_ids) == expected[:len(second.token_ids)]
    assert second.final.num_output_tokens == len(second.token_ids) > 0
    # The corrupt copies the second request touched were dropped, then rewritten whole.
    served = second.final.decode_instance
    touched = [p for p in corrupted if p.parent.parent.name == served]
    assert touched
    _wait_for(lambda: all(not p.exists() or p.read_bytes() != corrupted[p] for p in touched),
              20, "corrupt files to be dropped")
    _wait_for(lambda: len(_chunk_files(disk_dir, served)) >= 8, 20, "recomputed chunks stored")
    assert all(_valid(p) for p in _chunk_files(disk_dir, served))


# ---------------------------------------------------------------- 2. redis restart


def test_redis_restart_keeps_serving_and_router_view_recovers(cluster, config, redis_server):
    if redis_server is None:
        pytest.skip("redis-server binary not installed")
    router = cluster.cluster.backend.routers["decode"]
    before = _generate(cluster, DOC + "Before the outage.")
    assert before.final.num_output_tokens > 0
    redis_server.stop()
    try:
        outcomes = []
        for i in range(3):  # served (maybe degraded) or failed with a clear status
            prompt = f"During outage {i}. " + DOC
            try:
                result = _generate(cluster, prompt, timeout_s=30)
                assert list(result.token_ids) == _expected(config, prompt, 6)[:len(result.token_ids)]
                outcomes.append("ok")
            except GenerateError as exc:  # a clear gRPC status with a message, not a hang
                assert exc.code.name == "UNAVAILABLE" and exc.details, exc
                outcomes.append(exc.code.name)
    finally:
        redis_server.start()  # same port, empty: streams, groups and registry are gone
    assert "ok" in outcomes, outcomes
    # After Redis returns: registry refilled by heartbeats, events flow again, views OK.
    _wait_for(lambda: {i.instance_id for i in router.registry.alive()} >= {"decode-0", "decode-1"},
              20, "decode instances re-registered")
    after_prompt = "After the outage, a new document. " + DOC
    after = _generate(cluster, after_prompt)
    assert list(after.token_ids) == _expected(config, after_prompt, 6)[:len(after.token_ids)]
    route = router.request_for(Tokenizer.from_pretrained(config.model.path).encode(after_prompt),
                               _extra(cluster), "probe")

    def indexed() -> bool:
        with router.ingestor.lock:
            slot = router.index.slot_of(after.final.decode_instance)
            if slot is None:
                return False
            match = router.index.match(route.block_hashes, router.index.slot_mask([slot]))
        return match.matched_blocks(slot) >= len(route.block_hashes) - 1

    _wait_for(indexed, 30, "the router to index the new prompt's chunks (events flowing)")
    _wait_for(lambda: all(router.ingestor.view(i).state is ViewState.OK
                          for i in ("decode-0", "decode-1")), 30, "decode views back to OK")


def _extra(cluster):
    from kvcluster.common.hashing import ExtraKeys

    return ExtraKeys(cluster.cluster.backend.model_id, "")


# ---------------------------------------------------------------- 3. kill -9 decode


def test_kill9_decode_process_mid_stream_resumes_with_same_tokens(cluster, config):
    prompt = DOC + "Tell me a long story."
    expected = _expected(config, prompt, 60)
    tokens, victim, final = [], None, None
    began = time.monotonic()
    with KVClusterClient(cluster.address) as client:
        for event in client.generate_stream(prompt, params=SamplingParams(max_new_tokens=60),
                                            timeout_s=90):
            if isinstance(event, TokenEvent):
                tokens.extend(event.token_ids)
                if len(tokens) >= 5 and victim is None:
                    victim = _busy_decode(cluster)
                    pid = ray.get(victim.actor.__ray_call__.remote(lambda self: os.getpid()),
                                  timeout=10)
                    os.kill(pid, signal.SIGKILL)  # the actor's real worker process
            else:
                final = event
    assert victim is not None, "never got far enough to kill the decode process"
    assert final is not None and final.num_output_tokens == len(tokens)
    assert tokens == expected[:len(tokens)] and len(tokens) == len(expected)
    assert time.monotonic() - began < 90
    assert cluster.cluster.backend.stats["decode_retries"] >= 1
    # Ray restarts the process; it re-registers on a new receiver port and serves again.
    registry = cluster.cluster.backend.routers["decode"].registry
    old = victim.address
    _wait_for(lambda: victim.address != old and any(
        i.instance_id == victim.instance_id for i in registry.alive()), 60, "decode restart")
    again = _generate(cluster, "One more after the kill. " + DOC)
    assert again.final.num_output_tokens > 0


def _busy_decode(cluster):
    for handle in cluster.cluster.pools.decode:
        load, _, _ = ray.get(handle.actor.poll.remote(False), timeout=10)
        if load.active_decode_requests:
            return handle
    return cluster.cluster.pools.decode[0]
