import pytest

from kvcluster.common.events import (AllCleared, BlockRemoved, BlockStored, HashSettings,
                                     KVEventBatch, Tier)
from kvcluster.common.layout import KVLayout

SMOL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")


def test_sizes_derive_from_layout():
    assert SMOL.elements_per_token == 30 * 2 * 3 * 64
    assert SMOL.bytes_per_token == 23040
    assert SMOL.bytes_per_block == 23040 * 16
    assert SMOL.bytes_per_chunk(256) == 5_898_240
    assert SMOL.shape(256) == (30, 2, 256, 3, 64)
    assert SMOL.with_dtype("float32").bytes_per_token == 46080


def test_identity_distinguishes_layouts():
    assert SMOL.identity == "L30-H3-D64-B16-float16"
    assert SMOL.fingerprint != SMOL.with_dtype("bfloat16").fingerprint


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_layers=0), "num_layers"), (dict(head_dim=-1), "head_dim"),
    (dict(dtype="int4"), "dtype"),
])
def test_bad_layout_names_field(kwargs, field):
    base = dict(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4)
    with pytest.raises(ValueError, match=field):
        KVLayout(**{**base, **kwargs})


def test_event_batch_json_round_trip():
    batch = KVEventBatch("prefill-0", 7, HashSettings("m", 16, 64), [
        BlockStored((1, 2, 2**64 - 1), Tier.HOST, parent_hash=5),
        BlockRemoved((3,), Tier.DISK), AllCleared(), AllCleared(Tier.REDIS)])
    back = KVEventBatch.from_json(batch.to_json())
    assert back == batch and back.settings.tokens_per_hash == 64


def test_hash_settings_carry_the_tokens_per_hash():
    per_chunk, per_block = HashSettings("m", 16, 256), HashSettings("m", 16, 16)
    assert per_chunk != per_block
    assert per_chunk.differences(per_block) == ["tokens_per_hash 256 vs 16"]
    for bad in (24, -16):
        with pytest.raises(ValueError, match="tokens_per_hash"):
            HashSettings("m", 16, bad)


def test_batch_from_before_tokens_per_hash_reads_as_unannounced():
    text = '{"instance_id":"a","seq":0,"settings":["m",16,1],"events":[["C",null]]}'
    batch = KVEventBatch.from_json(text)
    assert batch.settings == HashSettings("m", 16, 0, 1)
    assert batch.settings != HashSettings("m", 16, 16)


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"instance_id":"a","seq":1,"settings":["m",16,1],'
                                  '"events":[["X",1]]}'])
def test_malformed_batch_is_a_clear_error(text):
    with pytest.raises(ValueError, match="malformed KV event batch"):
        KVEventBatch.from_json(text)
