"""kvstore: a tiered KV-cache store (device -> host -> disk -> Redis).

    store = build_store(config.store, layout, device=engine_device, model_id=model_id)
    keys = chunk_hashes(token_ids, layout.block_size, config.store.chunk_tokens, extra)
    store.put(keys, cache.export_blocks(block_ids))      # [L, 2, n*C, H, D]
    num, tiers = store.lookup(keys)
    kv = store.get(keys)                                 # [L, 2, num*C, H, D]

Chunk keys come from ``kvcluster.common.hashing.chunk_hashes`` (the router computes
the same ones). Design and on-disk format: docs/kvstore.md.
"""

from kvstore.chunk_spec import ChunkSpec
from kvstore.factory import build_store
from kvstore.metrics import StoreMetrics
from kvstore.store import Lookup, TieredStore

__all__ = ["ChunkSpec", "TieredStore", "Lookup", "StoreMetrics", "build_store"]
