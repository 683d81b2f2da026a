"""A worker node: the model runner, its kvstore and the KV-event publisher.

Both roles build one. The store's events feed the publisher, whose batches
reach the router over the event bus (in-process queue relayed by the front
end in the embedded default, Redis Streams in cluster mode).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

from kvcluster.common.config import ClusterConfig, StoreConfig
from kvcluster.common.events import HashSettings, Tier
from kvcluster.common.hashing import BlockHash, ExtraKeys, chunk_hashes
from kvcluster.engine.runner import ModelRunner
from kvstore import build_store
from kvstore.tiers.factory import default_disk_directory
from router.event_bus import EventBus, make_event_bus
from router.load import InstanceLoad
from router.publisher import KVEventPublisher

log = logging.getLogger(__name__)


def _own_disk_dir(store: StoreConfig, instance_id: str) -> StoreConfig:
    """Each instance gets its own folder under the configured disk directory."""
    if not store.disk.enabled:
        return store
    base = store.disk.directory or default_disk_directory()
    disk = dataclasses.replace(store.disk, directory=str(Path(base) / instance_id))
    return dataclasses.replace(store, disk=disk)


def build_runner(config: ClusterConfig) -> ModelRunner:
    return ModelRunner.from_pretrained(
        config.model.path, dtype=config.model.dtype, device=config.model.device,
        engine_config=config.engine, model_id=config.model.model_id or None)


def hash_settings(model_id: str, block_size: int, chunk_tokens: int) -> HashSettings:
    """What the router must share with the workers: their stores announce one key per
    store chunk, so one hash stands for ``chunk_tokens`` (``store.chunk_tokens``)."""
    return HashSettings(model_id, block_size, chunk_tokens)


class WorkerNode:
    def __init__(self, config: ClusterConfig, instance_id: str, role: str,
                 runner: ModelRunner | None = None, bus: EventBus | None = None):
        """
        Args:
            role: "prefill" or "decode": each pool's events go to its own router.
        """
        self.config = config
        self.instance_id = instance_id
        self.runner = runner or build_runner(config)
        self.layout = self.runner.layout
        self.chunk_tokens = config.store.chunk_tokens
        self.store = build_store(_own_disk_dir(config.store, instance_id), self.layout,
                                 device=self.runner.device, model_id=self.runner.model_id)
        self.bus = bus or make_event_bus(
            config.redis_url, prefix=f"{config.router.redis_prefix}:{role}")
        self.publisher = KVEventPublisher(instance_id, self.settings, self.bus)
        self.store.on_event.append(self.publisher.on_event)
        self.publisher.start()

    @property
    def settings(self) -> HashSettings:
        return hash_settings(self.runner.model_id, self.layout.block_size, self.chunk_tokens)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.layout.block_size

    def chunk_keys(self, token_ids: Sequence[int], tenant: str) -> list[BlockHash]:
        extra = ExtraKeys(self.runner.model_id, tenant)
        return chunk_hashes(token_ids, self.layout.block_size, self.chunk_tokens, extra)

    def load_prefix(self, keys: Sequence[BlockHash]) -> tuple[list[int], dict[str, int]]:
        """Copy the stored prefix of ``keys`` into fresh paged blocks.

        Returns:
            The blocks (one reference each, handed to the caller) and the
            number of tokens served from each tier.
        """
        kv, by_tier = self.read_prefix(keys)
        return (self.import_prefix(kv) if kv is not None else []), by_tier

    def read_prefix(self, keys: Sequence[BlockHash]):
        """The stored prefix of ``keys``: KV ``[L, 2, n * C, H, D]`` (None when nothing
        is stored) and the tokens served from each tier. Touches no engine state,
        so the engine may keep stepping meanwhile."""
        with self.store.pinned(keys):
            found = self.store.lookup(keys)
            if not found.num_chunks:
                return None, {}
            kv = self.store.get(keys[: found.num_chunks])  # [L, 2, n * C, H, D]
        num_chunks = kv.shape[2] // self.chunk_tokens
        by_tier = Counter(Tier(t).name.lower() for t in found.tiers[:num_chunks])
        return kv, {tier: n * self.chunk_tokens for tier, n in by_tier.items()}

    def import_prefix(self, kv) -> list[int]:
        """Fresh paged blocks holding ``kv`` (from :meth:`read_prefix`); one reference
        each, handed to the caller (who holds whatever guards the engine)."""
        block_ids = self.runner.blocks.allocate(kv.shape[2] // self.layout.block_size)
        self.runner.cache.import_blocks(block_ids, kv.to(self.runner.cache.dtype))
        return block_ids

    def export_new_chunks(self, token_ids: Sequence[int], block_table: Sequence[int],
                          tenant: str):
        """What :meth:`store.put` needs to keep the whole chunks of ``token_ids`` (KV in
        ``block_table``) that the store lacks: ``(keys, start, kv)``, ``kv`` a copy
        ``[L, 2, (len(keys) - start) * C, H, D]`` of chunks ``start..`` (the caller holds
        whatever guards the cache; the copy outlives the blocks)."""
        keys = self.chunk_keys(token_ids, tenant)
        if not keys or len(block_table) < len(keys) * self.blocks_per_chunk:
            return [], 0, []
        start = self.store.lookup(keys).num_chunks
        if start == len(keys):
            return keys, start, []
        kv = self.runner.cache.export_blocks(
            block_table[start * self.blocks_per_chunk:len(keys) * self.blocks_per_chunk])
        return keys, start, kv

    def save_chunks(self, keys: Sequence[BlockHash], kv, tenant: str) -> int:
        """Store whole chunks ``kv`` ``[L, 2, len(keys) * C, H, D]`` under ``keys``."""
        if not keys:
            return 0
        return self.store.put(keys, kv, tenant=tenant)

    def load(self, queued_prefill_tokens: int = 0, active_decode_requests: int = 0
             ) -> InstanceLoad:
        blocks = self.runner.blocks
        return InstanceLoad(queued_prefill_tokens, active_decode_requests,
                            blocks.num_used * self.layout.bytes_per_block,
                            blocks.num_blocks * self.layout.bytes_per_block)

    def stats(self) -> dict:
        """Per-tier usage and hits, for ``kvcluster status``."""
        metrics = self.store.metrics
        return {"instance_id": self.instance_id, "tiers": {
            t.name: {"used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                     "hits": metrics.value("kvstore_hits_total", tier=t.name), "up": t.is_up}
            for t in self.store.tiers}, "misses": metrics.value("kvstore_misses_total")}

    def close(self) -> None:
        self.publisher.stop()
        self.store.close()
