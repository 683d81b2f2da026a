"""kvstore: a tiered KV-cache store (device -> host -> disk -> Redis).

    store = build_store(config.store, layout, device=engine_device, model_id=model_id)
    keys = chunk_keys(token_ids, layout, extra, config.store.chunk_tokens)
    store.put(keys, cache.export_blocks(block_ids))      # [L, 2, n*C, H, D]
    num, tiers = store.lookup(keys)
    kv = store.get(keys)                                 # [L, 2, num*C, H, D]

Design and on-disk format: docs/kvstore.md.
"""

from kvstore.chunk_spec import ChunkSpec
from kvstore.factory import build_store
from kvstore.keys import chunk_keys, chunk_keys_from_block_hashes
from kvstore.metrics import StoreMetrics
from kvstore.store import Lookup, TieredStore

__all__ = ["ChunkSpec", "TieredStore", "Lookup", "StoreMetrics", "build_store", "chunk_keys",
           "chunk_keys_from_block_hashes"]
