"""Types shared by every package: pure Python, never imports torch."""

from kvcluster.common.events import (AllCleared, BlockRemoved, BlockStored, HashSettings,
                                     KVEvent, KVEventBatch, Tier)
from kvcluster.common.hashing import (HASH_VERSION, BlockHash, ExtraKeys, hash_block,
                                      hash_blocks, root_hash, tokens_hash)
from kvcluster.common.layout import KVLayout
from kvcluster.common.sampling import SamplingParams

__all__ = [
    "AllCleared", "BlockHash", "BlockRemoved", "BlockStored", "ExtraKeys", "HASH_VERSION",
    "HashSettings", "KVEvent", "KVEventBatch", "KVLayout", "SamplingParams", "Tier",
    "hash_block", "hash_blocks", "root_hash", "tokens_hash",
]
