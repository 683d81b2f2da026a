"""VLLMRehasher: vLLM block events (as msgpack decodes them) -> our chunk keys."""

from __future__ import annotations

import hashlib

import pytest

from kvcluster.common.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    HashSettings,
    Tier,
)
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from router.vllm_rehash import RehashMismatch, UnknownParent, VLLMRehasher

SETTINGS = HashSettings("m", 16, 64)
TOKENS = list(range(300, 300 + 256))


def vllm_hashes(tokens, block_size):
    parent, out = b"seed", []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + repr(tokens[start:start + block_size]).encode()).digest()
        out.append(parent)
    return out


def stored(tokens, block_size, first=0, last=None, extra_keys=None, lora=None, **fields):
    hashes = vllm_hashes(tokens, block_size)
    last = len(hashes) if last is None else last
    event = {"type": "BlockStored", "block_hashes": hashes[first:last],
             "parent_block_hash": hashes[first - 1] if first else None,
             "token_ids": tokens[first * block_size:last * block_size],
             "block_size": block_size, "lora_id": None, "medium": "GPU", "lora_name": lora}
    if extra_keys is not None:
        event["extra_keys"] = extra_keys
    event.update(fields)
    return event


def removed(tokens, block_size, indices, **fields):
    hashes = vllm_hashes(tokens, block_size)
    return {"type": "BlockRemoved", "block_hashes": [hashes[i] for i in indices],
            "medium": "GPU", **fields}


def ours(tokens, salt="", adapter=""):
    return tuple(h.u64 for h in chunk_hashes(tokens, 16, 64, ExtraKeys("m", salt, adapter)))


@pytest.mark.parametrize("vllm_block", [8, 16, 32, 64])
def test_chunk_keys_equal_ours_whatever_vllm_block_size(vllm_block):
    """Smaller than our hash step (tails carried), equal, larger, a whole chunk."""
    r = VLLMRehasher(SETTINGS)
    split = 128 // vllm_block
    out = r.translate([stored(TOKENS, vllm_block, last=split)])
    out += r.translate([stored(TOKENS, vllm_block, first=split)])
    assert [k for e in out for k in e.block_hashes] == list(ours(TOKENS))
    assert all(e.tier is Tier.DEVICE for e in out)


def test_a_chunk_is_announced_when_its_last_block_is_stored():
    r = VLLMRehasher(SETTINGS)
    assert r.translate([stored(TOKENS, 32, last=1)]) == []        # half a chunk
    assert r.translate([stored(TOKENS, 32, first=1, last=2)]) == [
        BlockStored(ours(TOKENS)[:1], Tier.DEVICE)]


def test_cache_salt_and_lora_seed_the_chain():
    r = VLLMRehasher(SETTINGS)
    salted = r.translate([stored(TOKENS[:64], 32, extra_keys=[["tenant-a"], None])])
    assert salted == [BlockStored(ours(TOKENS[:64], salt="tenant-a"), Tier.DEVICE)]
    lora = VLLMRehasher(SETTINGS).translate([stored(
        TOKENS[:64], 32, lora="ad1", extra_keys=[["ad1", "tenant-a"], ["ad1"]])])
    assert lora == [BlockStored(ours(TOKENS[:64], "tenant-a", "ad1"), Tier.DEVICE)]


def test_removal_takes_the_chunk_out_and_a_restore_brings_it_back():
    r = VLLMRehasher(SETTINGS)
    r.translate([stored(TOKENS, 32)])
    keys = ours(TOKENS)
    assert r.translate([removed(TOKENS, 32, [3])]) == [BlockRemoved((keys[1],), Tier.DEVICE)]
    assert r.translate([removed(TOKENS, 32, [2])]) == []         # chunk 1 already out
    # vLLM recomputes from the first missing block and stores the rest again
    assert r.translate([stored(TOKENS, 32, first=2)]) == [
        BlockStored((keys[1],), Tier.DEVICE)]


def test_cleared_drops_device_blocks_and_connector_events_pass_through():
    r = VLLMRehasher(SETTINGS)
    r.translate([stored(TOKENS, 32)])
    connector = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
                 "token_ids": [], "block_size": 64, "lora_id": None, "medium": "CPU",
                 "lora_name": None, "ownership": "kvcluster"}
    assert r.translate([connector]) == [BlockStored((11, 12), Tier.HOST)]
    assert r.translate([{"type": "AllBlocksCleared"}]) == [AllCleared(Tier.DEVICE)]
    assert r.num_blocks == 0
    gone = {"type": "BlockRemoved", "block_hashes": [12], "medium": "STORAGE",
            "ownership": "kvcluster"}
    assert r.translate([gone]) == [BlockRemoved((12,), Tier.DISK)]


def test_an_unknown_parent_raises_unless_lenient():
    r = VLLMRehasher(SETTINGS)
    with pytest.raises(UnknownParent):
        r.translate([stored(TOKENS, 32, first=2)])
    assert r.translate([stored(TOKENS, 32, first=2)], lenient=True) == []


def test_settings_that_cannot_be_rehashed_raise_with_what_vllm_uses():
    with pytest.raises(RehashMismatch, match="does not divide") as info:
        VLLMRehasher(SETTINGS).translate([stored(TOKENS[:96], 48)])
    assert info.value.settings == HashSettings("m", 48, 48)
    no_tokens = stored(TOKENS[:64], 32)
    no_tokens["token_ids"] = []
    with pytest.raises(RehashMismatch, match="token ids"):
        VLLMRehasher(SETTINGS).translate([no_tokens])
    connector = {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                 "token_ids": [], "block_size": 256, "medium": "CPU", "ownership": "kvcluster"}
    with pytest.raises(RehashMismatch, match="chunk keys of 256") as info:
        VLLMRehasher(SETTINGS).translate([connector])
    assert info.value.settings == HashSettings("m", 16, 256)


def test_multimodal_blocks_and_other_groups_are_skipped_and_counted():
    r = VLLMRehasher(SETTINGS)
    mm = stored(TOKENS[:128], 32, extra_keys=[None, [["img-1", 0]], None, None])
    assert r.translate([mm]) == []          # block 0 alone is half a chunk; 1-3 opaque
    assert r.opaque_blocks == 3 and r.num_blocks == 1
    assert r.translate([stored(TOKENS, 32, first=4)]) == []      # chained on opaque KV
    other = stored(TOKENS[:64], 32, group_idx=1)
    assert VLLMRehasher(SETTINGS).translate([other]) == []
    with pytest.raises(ValueError, match="unknown vLLM KV event"):
        r.translate([{"type": "Nope"}])
