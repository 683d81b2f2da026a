"""The one block owner: exact ids and free-list order, reference counts, and a hash
registry that forgets a block the moment it is handed out again."""

from __future__ import annotations

import pytest

from kvcluster.common.hashing import ExtraKeys, hash_blocks
from kvcluster.engine.block_manager import BlockManager, OutOfBlocksError

HASHES = hash_blocks(list(range(16)), 4, ExtraKeys("m"))  # 4 chained block hashes


def test_hands_out_exact_ids_in_free_list_order():
    blocks = BlockManager(4)
    assert blocks.allocate(2) == [0, 1]
    assert blocks.allocate(1) == [2]
    blocks.free([1, 0])
    assert blocks.free_block_ids() == [3, 1, 0]
    assert blocks.allocate(2) == [3, 1]
    assert not blocks.can_allocate(2) and blocks.can_allocate(1)
    assert blocks.num_used == 3
    with pytest.raises(OutOfBlocksError, match="need 2 KV blocks, only 1 of 4 free"):
        blocks.allocate(2)


def test_reference_counts_and_revival():
    blocks = BlockManager(3)
    block_ids = blocks.allocate(2)  # [0, 1]
    blocks.share([0])
    blocks.free(block_ids)
    assert blocks.ref_count(0) == 1 and blocks.ref_count(1) == 0
    assert blocks.free_block_ids() == [2, 1]
    blocks.share([1])  # revive a free block: it leaves the free list
    assert blocks.free_block_ids() == [2] and blocks.ref_count(1) == 1
    blocks.free([0, 1])
    with pytest.raises(ValueError, match="block 0 is already free"):
        blocks.free([0])
    with pytest.raises(ValueError, match="out of range"):
        blocks.share([7])


def test_freed_blocks_stay_matchable_until_handed_out_again():
    blocks = BlockManager(4)
    block_ids = blocks.allocate(3)  # [0, 1, 2]
    blocks.cache_full_blocks(HASHES[:3], block_ids)
    blocks.free(block_ids)
    assert blocks.free_block_ids() == [3, 0, 1, 2]
    assert blocks.match(HASHES) == [0, 1, 2] and blocks.num_cached == 3
    # whoever allocates (engine, received-KV sink, store loader) makes the registry forget
    assert blocks.allocate(2) == [3, 0]
    assert blocks.match(HASHES) == [] and blocks.num_cached == 2
    assert blocks.match(HASHES[1:]) == [1, 2]  # a later block keeps its own entry


def test_sharing_counts_revived_blocks_against_the_free_pool():
    blocks = BlockManager(4)
    block_ids = blocks.allocate(2)
    blocks.cache_full_blocks(HASHES[:2], block_ids)
    blocks.free(block_ids)
    cached = blocks.match(HASHES)
    assert cached == [0, 1]
    assert blocks.can_share(cached, 2) and not blocks.can_share(cached, 3)
    blocks.share(cached)
    assert blocks.free_block_ids() == [2, 3] and blocks.ref_count(0) == 1


def test_first_registration_wins_and_free_blocks_cannot_be_cached():
    blocks = BlockManager(4)
    first, second = blocks.allocate(1), blocks.allocate(1)
    blocks.cache_full_blocks(HASHES[:1], first)
    blocks.cache_full_blocks(HASHES[:1], second)  # the same prefix computed twice
    assert blocks.match(HASHES) == first
    blocks.cache_full_blocks(HASHES[:1], first)  # re-registering under its own hash: no-op
    assert blocks.num_cached == 1
    with pytest.raises(ValueError, match="2 hashes for 1 blocks"):
        blocks.cache_full_blocks(HASHES[:2], first)
    with pytest.raises(ValueError, match="block 2 is free"):
        blocks.cache_full_blocks(HASHES[1:2], [2])


def test_reset_prefix_cache_forgets_only_free_blocks():
    blocks = BlockManager(4)
    block_ids = blocks.allocate(2)
    blocks.cache_full_blocks(HASHES[:2], block_ids)
    blocks.free(block_ids[1:])  # block 1 free, block 0 in use
    assert blocks.reset_prefix_cache() == 1
    assert blocks.match(HASHES) == [0] and blocks.num_cached == 1
