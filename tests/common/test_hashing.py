import os
import subprocess
import sys

import pytest

from kvcluster.common.hashing import (BlockHash, ExtraKeys, chunk_hashes, hash_block,
                                      hash_blocks, root_hash, tokens_hash)

SMOL = ExtraKeys("SmolLM2-135M-Instruct")

# Golden digests: these must never change without bumping HASH_VERSION, or every
# stored chunk and every router index silently stops matching.
GOLDEN_ROOT = "f5d8d575019ba393950903cf858757888167a091733326cbca1355cc154f973a"
GOLDEN_BLOCKS = [
    "554be550e140356f641858a4acc575d5c7d04d5f79666d3cac5adb4ad9dca9bd",
    "8d1bb9b91d952f648d441ddff218b849299170f648fc28c05549c1c8a3e0d2c9",
]


def test_golden_digests():
    assert root_hash(ExtraKeys("m", "t", "a")).hex() == GOLDEN_ROOT
    hashes = hash_blocks(list(range(40)), 16, SMOL)
    assert [h.hex() for h in hashes] == GOLDEN_BLOCKS
    assert hashes[-1].u64 == 7219152682600700813
    assert tokens_hash([1, 2, 3]) == 3347991885368151351


def test_only_full_blocks_are_hashed():
    assert len(hash_blocks(list(range(15)), 16, SMOL)) == 0
    assert len(hash_blocks(list(range(47)), 16, SMOL)) == 2


def test_chain_implies_prefix():
    a = hash_blocks([1] * 16 + [2] * 16, 16, SMOL)
    b = hash_blocks([9] * 16 + [2] * 16, 16, SMOL)
    assert a[1] != b[1], "same last block, different prefix must differ"
    assert hash_block(a[0], [2] * 16) == a[1]


@pytest.mark.parametrize("field", ["model_id", "tenant_salt", "adapter_id"])
def test_every_extra_key_changes_the_hash(field):
    base = dict(model_id="m", tenant_salt="t", adapter_id="a")
    other = ExtraKeys(**{**base, field: base[field] + "x"})
    assert hash_blocks([1] * 16, 16, ExtraKeys(**base)) != hash_blocks([1] * 16, 16, other)


def test_field_boundaries_are_unambiguous():
    # Length prefixes keep ("ab", "c") distinct from ("a", "bc").
    assert root_hash(ExtraKeys("ab", "c")) != root_hash(ExtraKeys("a", "bc"))


def test_identical_across_processes_with_different_hash_seeds():
    code = ("from kvcluster.common.hashing import *;"
            "print(hash_blocks(list(range(64)), 16, ExtraKeys('m', 'tenant'))[-1].hex())")
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    outs.add(hash_blocks(list(range(64)), 16, ExtraKeys("m", "tenant"))[-1].hex() + "\n")
    assert len(outs) == 1


def test_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2], 0, SMOL)
    with pytest.raises(ValueError, match="token ids"):
        hash_blocks([-1] * 16, 16, SMOL)
    with pytest.raises(ValueError, match="32 bytes"):
        BlockHash(b"short")


def test_chunk_hashes_are_every_nth_block_hash():
    tokens = list(range(37))  # 4 full chunks of 8 tokens (blocks of 4), 5 left over
    extra = ExtraKeys("tiny", "tenant-a")
    blocks = hash_blocks(tokens, 4, extra)
    keys = chunk_hashes(tokens, 4, 8, extra)
    assert keys == [blocks[1], blocks[3], blocks[5], blocks[7]]
    assert chunk_hashes(tokens, 4, 8, ExtraKeys("tiny", "tenant-b"))[0] != keys[0]
    assert chunk_hashes(tokens, 4, 4, extra) == blocks
    with pytest.raises(ValueError, match="multiple"):
        chunk_hashes(tokens, 4, 6, extra)
