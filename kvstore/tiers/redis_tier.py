"""Redis tier: chunks as values in a real Redis server, with a TTL.

Key names are namespaced by model, tenant and layout::

    PREFIX:MODEL_ID:TENANT:LAYOUT_FINGERPRINT(hex16):CHUNK_KEY(hex64)

The chunk key already includes the tenant's cache salt (it seeds the hash
chain), so tenants can never read each other's KV; the namespace adds an
operational boundary (per-tenant listing, flush, ACL key patterns).

Batches use MGET; values are the chunk's raw bytes (checked by length).

If Redis goes away (connection refused, timeout), the tier logs one warning,
forgets everything it held (reported lost), and stays off for
``retry_after_s``; the next call after that pings and, if Redis answers,
turns the tier back on. Nothing raises to the caller.

Redis outlives the worker: on start the tier indexes the chunks already there
under its model and layout (a previous run's), oldest first by remaining TTL,
up to its capacity. (Not when Redis itself comes back: the store indexes a
tier's keys only when it adopts the tier, and a restarted Redis is empty unless
it persists.)
"""

from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np
import redis
import torch

from kvcluster.common.events import Tier
from kvstore.chunk_spec import ChunkSpec
from kvstore.copy import copy_kv
from kvstore.policy import EvictionPolicy
from kvstore.tiers.base import StorageTier

log = logging.getLogger(__name__)

_DOWN_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


class RedisTier(StorageTier):
    kind = Tier.REDIS

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
        *,
        url: str,
        model_id: str,
        ttl_s: int = 3600,
        retry_after_s: float = 5.0,
        socket_timeout_s: float = 2.0,
        key_prefix: str = "kvc",
    ):
        super().__init__(spec, capacity_bytes, policy, lock)
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self.ttl_ms = int(ttl_s * 1000)
        self.retry_after_s = retry_after_s
        self._prefix = f"{key_prefix}:{_safe(model_id)}:"
        self._layout_tag = f"{spec.layout.fingerprint:016x}"
        self._names: dict[bytes, str] = {}
        self._stage = torch.zeros(spec.chunk_bytes, dtype=torch.uint8)
        self._up = True
        self._retry_at = 0.0
        self._adopt_existing()

    # ---------------------------------------------------------- public

    @property
    def available(self) -> bool:
        if not self._up and time.monotonic() >= self._retry_at:
            self._try_reconnect()
        return self._up

    @property
    def is_up(self) -> bool:
        return self._up

    def name_of(self, key: bytes, tenant: str = "") -> str:
        return f"{self._prefix}{_safe(tenant) or '_'}:{self._layout_tag}:{key.hex()}"

    def write(self, key: bytes, src: torch.Tensor, tenant: str = "") -> bool:
        if src.device.type != "cpu" or not src.is_contiguous():
            copy_kv(self.spec.typed(self._stage), src)
            src = self._stage
        name = self.name_of(key, tenant)
        if not self._call(self.client.set, name, memoryview(src.view(-1).view(torch.uint8).numpy()),
                          px=self.ttl_ms):
            return False
        self._names[key] = name
        self._charge(key, self.spec.chunk_bytes)
        return True

    def read_into(self, key: bytes, dst: torch.Tensor) -> bool:
        return self.read_many([key], [dst])[0]

    def read_many(self, keys: list[bytes], dsts: list[torch.Tensor]) -> list[bool]:
        """One MGET for many chunks."""
        names = [self._names.get(k) for k in keys]
        if None in names or not self.available:
            return [False] * len(keys)
        values = self._call(self.client.mget, names)
        if values is None:
            return [False] * len(keys)
        return [self._copy_value(k, v, d) for k, v, d in zip(keys, values, dsts)]

    def delete_many(self, keys: list[bytes]) -> None:
        names = [self._names[k] for k in keys if k in self._names]
        for key in keys:
            super().delete(key)
        if names and self._up:
            self._call(self.client.unlink, *names)

    def delete(self, key: bytes) -> None:
        self.delete_many([key])

    def clear(self) -> None:
        self.delete_many(list(self._names))

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------- private

    def _copy_value(self, key: bytes, value: bytes | None, dst: torch.Tensor) -> bool:
        if value is None or len(value) != self.spec.chunk_bytes:
            why = "expired" if value is None else "bad length"
            log.info("redis tier: chunk %s %s", key.hex()[:16], why)
            self._lose([key], why)
            return False
        self._stage.numpy()[:] = np.frombuffer(value, dtype=np.uint8)
        copy_kv(dst, self.spec.typed(self._stage))
        return True

    def _call(self, fn, *args, **kwargs):
        """Run one Redis command; on a connection error turn the tier off."""
        if not self._up:
            return None
        try:
            return fn(*args, **kwargs) or True
        except _DOWN_ERRORS as exc:
            self._go_down(exc)
            return None

    def _go_down(self, exc: Exception) -> None:
        log.warning("redis tier: Redis unreachable (%s); disabled for %.1fs", exc,
                    self.retry_after_s)
        self._up = False
        self._retry_at = time.monotonic() + self.retry_after_s
        lost = list(self._names)
        self._names.clear()
        for key in lost:
            super().delete(key)
        if lost:
            self.on_lost(self, lost, "unavailable")

    def _try_reconnect(self) -> None:
        try:
            self.client.ping()
        except _DOWN_ERRORS:
            self._retry_at = time.monotonic() + self.retry_after_s
            return
        log.warning("redis tier: Redis is back; tier enabled")
        self._up = True

    def _discard(self, key: bytes) -> None:
        self._names.pop(key, None)

    def _adopt_existing(self) -> None:
        """Index chunks already in Redis for this model and layout (any tenant)."""
        pattern = f"{self._prefix}*:{self._layout_tag}:*"
        try:
            names = [n for n in self.client.scan_iter(match=pattern, count=1000)
                     if _key_of(n) not in self._names]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.pttl(name)
            ttls = pipe.execute() if names else []
        except _DOWN_ERRORS as exc:
            self._go_down(exc)
            return
        live = sorted((ttl, name) for ttl, name in zip(ttls, names) if ttl > 0)
        for _ttl, name in live:
            key = _key_of(name)
            if key is None or not self.has_space():
                continue
            self._names[key] = name.decode()
            self._charge(key, self.spec.chunk_bytes)
        if live:
            log.info("redis tier: indexed %d chunks already in Redis", len(self))


def _key_of(name: bytes) -> bytes | None:
    """The chunk key at the end of a key name, or None if it is not one of ours."""
    digest = name.rsplit(b":", 1)[-1]
    try:
        key = bytes.fromhex(digest.decode())
    except ValueError:
        return None
    return key if len(key) == 32 else None


def _safe(part: str) -> str:
    """Keep key names printable and free of our ':' separator."""
    return _UNSAFE.sub("_", part)
