"""TieredStore: chunks of KV in device -> host -> disk -> Redis, one tier each.

Invariants (checked by tests/kvstore):
* a chunk lives in exactly one tier (exclusive caching); ``_where`` says which;
* no tier's charged bytes ever exceed its capacity;
* a full tier evicts by its policy and the victim spills to the next tier
  down that can take it; past the last tier it is dropped;
* a pinned chunk (ref count > 0) is never evicted;
* a hit below the top tier moves the chunk to the top (``promote_on_hit``);
* every change is announced as a KV event (BlockStored / BlockRemoved /
  AllCleared with the tier), in the order it happened.

One re-entrant lock, shared with the tiers, guards every operation; data is
copied under it, so a get racing a spill sees either the source or the
destination, never a half-moved chunk. Subscribers run under the lock too:
keep them quick (append to a queue).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import groupby
from time import perf_counter
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from kvcluster.common.events import AllCleared, BlockStored, KVEvent, Tier
from kvcluster.common.hashing import BlockHash
from kvstore.chunk_spec import ChunkSpec, KVInput
from kvstore.events import EventSink
from kvstore.metrics import StoreMetrics
from kvstore.pins import PinTable
from kvstore.tiers.base import StorageTier


class Lookup(NamedTuple):
    num_chunks: int
    """Length of the longest stored prefix, in chunks."""
    tiers: list[Tier]
    """The tier of each chunk of that prefix."""


class TieredStore:
    def __init__(
        self,
        spec: ChunkSpec,
        tiers: Sequence[StorageTier],
        *,
        promote_on_hit: bool = True,
        metrics: StoreMetrics | None = None,
    ):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.spec = spec
        self.tiers = sorted(tiers, key=lambda t: t.kind)
        if len({t.kind for t in self.tiers}) != len(self.tiers):
            raise ValueError("at most one tier of each kind")
        self.lock: threading.RLock = self.tiers[0].lock
        if any(t.lock is not self.lock for t in self.tiers):
            raise ValueError("every tier must share the store's lock")
        self.promote_on_hit = promote_on_hit
        self.metrics = metrics or StoreMetrics()
        self.events = EventSink()
        self.on_event: list[Callable[[KVEvent], None]] = self.events.subscribers
        self._tier_of = {t.kind: t for t in self.tiers}
        self._where: dict[bytes, Tier] = {}
        self._pins = PinTable()
        self._tenant: dict[bytes, str] = {}
        self._staging = {t.kind: torch.zeros(spec.chunk_bytes, dtype=torch.uint8)
                         for t in self.tiers if not t.peekable}
        self._promo_buf = torch.zeros(spec.chunk_bytes, dtype=torch.uint8)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvstore-prefetch")
        for tier in self.tiers:
            self._adopt(tier)

    # ------------------------------------------------------------ public API

    @property
    def top(self) -> StorageTier:
        return self.tiers[0]

    def put(self, keys: Sequence[BlockHash], kv: KVInput, tenant: str = "",
            start: int = 0) -> int:
        """Store the chunks of ``kv`` under ``keys`` (prefix order).

        Args:
            keys: one chunk key per chunk (see :func:`kvcluster.common.hashing.chunk_hashes`).
            kv: the chunks of ``keys[start:]``: ``layout.shape(n * chunk_tokens)``
                (the engine's ``export_blocks`` order), ``(n, *chunk shape)``, or a
                list of per-chunk tensors / raw bytes.
            tenant: namespace label for the Redis tier.
            start: ``keys[:start]`` were stored already (a :meth:`lookup` said so):
                they are only touched, and ``kv`` leaves them out.
        Returns:
            How many chunks were newly stored (already-stored ones are only
            touched; a chunk no tier can take is skipped).
        """
        chunks = self.spec.split(kv, len(keys) - start)
        with self.lock:
            for key in keys[:start]:
                self._touch(key.digest)
            stored, parent = 0, keys[start - 1].digest if start else None
            for key, chunk in zip(keys[start:], chunks):
                stored += self._put_one(key.digest, chunk, tenant, parent)
                parent = key.digest
            self.events.flush()
        return stored

    def lookup(self, keys: Sequence[BlockHash]) -> Lookup:
        """Longest stored prefix of ``keys`` and the tier of each of its chunks.

        O(1) per key (one dict probe); changes nothing.
        """
        with self.lock:
            tiers = list(map(self._where.get, [k.digest for k in keys]))
        try:
            num = tiers.index(None)
            del tiers[num:]
        except ValueError:
            num = len(tiers)
        return Lookup(num, tiers)

    def get(
        self,
        keys: Sequence[BlockHash],
        out: torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """KV of the longest stored prefix of ``keys``.

        Args:
            out: optional destination ``layout.shape(m)`` with
                ``m >= len(keys) * chunk_tokens`` (no allocation then).
            device: where to allocate the result when ``out`` is None
                (default: the top tier's device).
        Returns:
            ``layout.shape(n * chunk_tokens)``: a view of ``out`` when given;
            ``n = result.shape[2] // chunk_tokens`` chunks were found.
        """
        with self.lock:
            num = self.lookup(keys).num_chunks
            digests = [k.digest for k in keys[:num]]
            out = self._output(num, out, device)
            with self._pins.held(digests):
                served = self._serve(digests, out)
            self.metrics.misses.inc(len(keys) - served)
            self.events.flush()
        return out[:, :, : served * self.spec.chunk_tokens]

    async def aget(
        self,
        keys: Sequence[BlockHash],
        out: torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """:meth:`get` on a worker thread, for asyncio callers."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.get, keys, out, device))

    def prefetch(self, keys: Sequence[BlockHash]) -> Future:
        """Move the stored prefix of ``keys`` into the top (device) tier, in the
        background. The future's result is how many of its chunks are there
        (``await asyncio.wrap_future(...)`` from asyncio)."""
        digests = [k.digest for k in keys]
        return self._executor.submit(self._prefetch, digests)

    def remove(self, keys: Sequence[BlockHash]) -> int:
        """Drop stored chunks (pinned ones are kept). Returns how many went."""
        with self.lock:
            gone: dict[Tier, list[bytes]] = {}
            for key in keys:
                kind = self._where.get(key.digest)
                if kind is not None and key.digest not in self._pins:
                    gone.setdefault(kind, []).append(key.digest)
            for kind, digests in gone.items():
                for d in digests:
                    self._tier_of[kind].delete(d)
                    self._forget(d)
                self.events.removed(digests, kind)
            self.events.flush()
        return sum(map(len, gone.values()))

    def clear(self) -> None:
        """Drop every chunk in every tier (pins are kept as counts)."""
        with self.lock:
            for tier in self.tiers:
                tier.clear()
            self._where.clear()
            self._tenant.clear()
            self.events.emit(AllCleared(None))

    def pin(self, keys: Sequence[BlockHash]) -> None:
        """+1 reference on each key: while > 0 the chunk is never evicted."""
        with self.lock:
            self._pins.pin(k.digest for k in keys)

    def unpin(self, keys: Sequence[BlockHash]) -> None:
        with self.lock:
            self._pins.unpin(k.digest for k in keys)

    @contextmanager
    def pinned(self, keys: Sequence[BlockHash]) -> Iterator[None]:
        """``with store.pinned(keys): ...`` pins for the block's duration."""
        self.pin(keys)
        try:
            yield
        finally:
            self.unpin(keys)

    def pin_count(self, key: BlockHash) -> int:
        return self._pins.count(key.digest)

    def tier_of(self, key: BlockHash) -> Tier | None:
        return self._where.get(key.digest)

    def __len__(self) -> int:
        return len(self._where)

    def snapshot_events(self) -> list[KVEvent]:
        """BlockStored events describing everything stored now (a resync,
        e.g. after a restart rebuilt the disk tier's index)."""
        with self.lock:
            return [BlockStored(tuple(_u64(d) for d in t.keys()), t.kind)
                    for t in self.tiers if len(t)]

    def flush(self) -> None:
        """Wait for background disk writes."""
        for tier in self.tiers:
            tier.flush()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()

    # ------------------------------------------------------------ placement

    def _touch(self, d: bytes) -> bool:
        """Refresh a stored chunk in its tier's eviction policy; False if not stored."""
        kind = self._where.get(d)
        if kind is not None:
            self._tier_of[kind].policy.touch(d)
        return kind is not None

    def _put_one(self, d: bytes, chunk: torch.Tensor, tenant: str, parent: bytes | None) -> int:
        if self._touch(d):
            return 0
        kind = self._place(d, chunk, tenant, 0)
        if kind is None:
            return 0
        self.events.stored(d, kind, parent)
        return 1

    def _place(self, d: bytes, chunk: torch.Tensor, tenant: str, start: int) -> Tier | None:
        """Write ``chunk`` into the first tier from ``start`` down with room."""
        for tier in self.tiers[start:]:
            if self._make_room(tier) and tier.write(d, chunk, tenant):
                self._where[d] = tier.kind
                if tenant:
                    self._tenant[d] = tenant
                return tier.kind
        return None

    def _make_room(self, tier: StorageTier) -> bool:
        """Evict from ``tier`` (spilling down) until one chunk fits."""
        if not tier.can_ever_hold():
            return False
        if not tier.accepting():
            self.metrics.skipped.labels(tier.name).inc()
            return False
        while not tier.has_space():
            victim = tier.policy.pop_victim(self._pins.__contains__)
            if victim is None:
                return False
            self._spill(tier, victim)
        return tier.accepting()

    def _spill(self, tier: StorageTier, victim: bytes) -> None:
        """Move ``victim`` (already out of ``tier``'s policy) one tier down or drop it."""
        start = perf_counter()
        below = self.tiers.index(tier) + 1
        dest = None
        if below < len(self.tiers):
            src = self._readable(tier, victim, self._staging.get(tier.kind))
            if src is None:
                return  # the tier lost it while reading: already reported
            dest = self._place(victim, src, self._tenant.get(victim, ""), below)
        tier.delete(victim)
        self.metrics.evictions.labels(tier.name).inc()
        self.events.removed([victim], tier.kind)
        if dest is None:
            self._forget(victim)
            self.metrics.dropped.inc()
        else:
            self.events.stored(victim, dest, None)
        self.metrics.spill_seconds.labels(tier.name).observe(perf_counter() - start)

    def _readable(self, tier: StorageTier, d: bytes, buf: torch.Tensor | None):
        """A typed tensor holding chunk ``d``: a view if the tier allows, else read into ``buf``."""
        view = tier.peek(d)
        if view is not None:
            return view
        dst = self.spec.typed(buf)
        return dst if tier.read_into(d, dst) else None

    # ------------------------------------------------------------ reads

    def _serve(self, digests: list[bytes], out: torch.Tensor) -> int:
        """Copy chunks into ``out`` in prefix order; stop at the first failure."""
        served = 0
        for kind, group in groupby(enumerate(digests), key=lambda p: self._where.get(p[1])):
            if kind is None:
                return served
            tier, batch = self._tier_of[kind], list(group)
            dsts = [self.spec.tokens_view(out, i) for i, _d in batch]
            oks = tier.read_many([d for _i, d in batch], dsts)
            for (_i, d), dst, ok in zip(batch, dsts, oks):
                if not ok:
                    return served
                served += 1
                self.metrics.hits.labels(tier.name).inc()
                tier.policy.touch(d)
                if self.promote_on_hit and tier is not self.top:
                    self._promote(d, dst)
        return served

    def _promote(self, d: bytes, src: torch.Tensor) -> bool:
        """Move chunk ``d`` (its bytes already in ``src``) into the top tier."""
        kind = self._where[d]
        if not self._make_room(self.top) or not self.top.write(d, src, self._tenant.get(d, "")):
            return False
        self._tier_of[kind].delete(d)
        self._where[d] = self.top.kind
        self.metrics.promotions.labels(kind.name.lower()).inc()
        self.events.removed([d], kind)
        self.events.stored(d, self.top.kind, None)
        return True

    def _prefetch(self, digests: list[bytes]) -> int:
        with self.lock:
            num = self.lookup([BlockHash(d) for d in digests]).num_chunks
            with self._pins.held(digests[:num]):
                for d in digests[:num]:
                    kind = self._where.get(d)
                    if kind is None:
                        break
                    if kind != self.top.kind:
                        src = self._readable(self._tier_of[kind], d, self._promo_buf)
                        if src is None or not self._promote(d, src):
                            break
            self.events.flush()
            return sum(self._where.get(d) == self.top.kind for d in digests[:num])

    def _output(self, num_chunks: int, out: torch.Tensor | None, device) -> torch.Tensor:
        if out is None:
            return self.spec.empty_tokens(num_chunks, device or getattr(self.top, "device", "cpu"))
        self.spec.check_tokens(out, num_chunks)
        return out

    # ------------------------------------------------------------ bookkeeping

    def _adopt(self, tier: StorageTier) -> None:
        tier.on_lost = self._on_lost
        self.metrics.watch(tier)
        for d in tier.keys():  # e.g. the disk tier's rebuilt index
            if d in self._where:
                tier.delete(d)
            else:
                self._where[d] = tier.kind

    def _on_lost(self, tier: StorageTier, digests: list[bytes], reason: str) -> None:
        with self.lock:
            mine = [d for d in digests if self._where.get(d) == tier.kind]
            for d in mine:
                self._forget(d)
            self.metrics.lost.labels(tier.name, reason).inc(len(digests))
            if mine:
                self.events.removed(mine, tier.kind)
                self.events.flush()

    def _forget(self, d: bytes) -> None:
        self._where.pop(d, None)
        self._tenant.pop(d, None)



def _u64(d: bytes) -> int:
    return int.from_bytes(d[:8], "little")
