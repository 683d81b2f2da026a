"""Helpers for the kvstore tests: a tiny layout, stores built by capacity in
chunks, and a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import torch

from kvcluster.common.hashing import BlockHash, ExtraKeys, chunk_hashes
from kvcluster.common.layout import KVLayout
from kvstore import ChunkSpec, TieredStore
from kvstore.metrics import StoreMetrics
from kvstore.policy import make_policy
from kvstore.tiers import DeviceTier, DiskTier, HostTier, RedisTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=4, dtype="float16")
SPEC = ChunkSpec(LAYOUT, chunk_tokens=8)  # 256 bytes a chunk
CHUNK = SPEC.chunk_bytes
DISK_CHUNK = CHUNK + 128  # header + payload


def make_keys(num: int, seed: int = 0, tenant: str = "") -> list[BlockHash]:
    tokens = [(seed * 1_000_003 + i) % 50_000 for i in range(num * SPEC.chunk_tokens)]
    return chunk_hashes(tokens, LAYOUT.block_size, SPEC.chunk_tokens, ExtraKeys("tiny", tenant))


def make_kv(num: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(num * SPEC.chunk_tokens), generator=gen).half()


def build(*, device=0, host=0, disk=0, redis=0, policy="lru", directory=None, redis_url=None,
          promote=True, **disk_kwargs) -> TieredStore:
    """A store with the given capacities, in chunks (0: tier absent)."""
    lock = threading.RLock()
    tiers = []
    if device:
        tiers.append(DeviceTier(SPEC, device * CHUNK, make_policy(policy, device), lock))
    if host:
        tiers.append(HostTier(SPEC, host * CHUNK, make_policy(policy, host), lock))
    if disk:
        tiers.append(DiskTier(SPEC, disk * DISK_CHUNK, make_policy(policy, disk), lock,
                              directory=directory, **disk_kwargs))
    if redis:
        tiers.append(RedisTier(SPEC, redis * CHUNK, make_policy(policy, redis), lock,
                               url=redis_url, model_id="tiny", retry_after_s=0.2,
                               socket_timeout_s=0.5))
    return TieredStore(SPEC, tiers, promote_on_hit=promote, metrics=StoreMetrics())


# ---------------------------------------------------------------- redis


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
