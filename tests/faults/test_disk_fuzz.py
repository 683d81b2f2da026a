"""Fuzzing the disk tier's reader: random and mutated chunk files in its directory.

Each example writes valid chunk files, then replaces some of them with random
bytes, flipped bytes, truncations, extensions or *re-sealed* headers (fields
changed, header checksum recomputed, so only the deeper checks can catch them),
adds stray files, and starts a new store on the directory. The start-up index
rebuild and every get must finish without raising, and a chunk that is served
must be byte-for-byte the chunk written under that key: corrupt files are
discarded, never served.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.tiers.disk_format import FLAG_ZSTD, HEADER_SIZE, ChunkHeader
from tests.kvstore.helpers import SPEC, build, make_keys, make_kv

NUM = 4
KEYS, KV = make_keys(NUM, seed=11), make_kv(NUM, seed=11)
FIELDS = ("flags", "chunk_tokens", "raw_len", "payload_len", "payload_checksum",
          "layout_fingerprint", "key")


def _valid_files(compression: str) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        store = build(disk=10, directory=tmp, compression=compression)
        store.put(KEYS, KV)
        store.flush()
        root = store.tiers[0].root
        files = {p.name: p.read_bytes() for p in root.glob("*.kvc")}
        store.close()
    assert len(files) == NUM
    return files


VALID = {c: _valid_files(c) for c in ("none", "zstd")}


def _reseal(data: bytes, field: str, value: int) -> bytes:
    header = ChunkHeader.unpack(data)
    if field == "key":
        new = dataclasses.replace(header, key=value.to_bytes(32, "little"))
    elif field == "flags":
        new = dataclasses.replace(header, flags=value & 0xFFFF)
    else:
        new = dataclasses.replace(header, **{field: value})
    return new.pack() + data[HEADER_SIZE:]


mutation = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=3000)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
                                        min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 3000)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("reseal"), st.tuples(
        st.sampled_from(FIELDS),
        st.one_of(st.integers(0, 4096), st.sampled_from([FLAG_ZSTD, 0, 2 ** 31]),
                  st.integers(0, 2 ** 32 - 1)))),
)


def _mutate(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "random":
        return arg
    if kind == "flip":
        buf = bytearray(data)
        for pos, mask in arg:
            buf[pos % len(buf)] ^= mask
        return bytes(buf)
    if kind == "truncate":
        return data[: arg % (len(data) + 1)]
    if kind == "extend":
        return data + arg
    field, value = arg  # every value fits its field (flags are masked to 16 bits)
    return _reseal(data, field, value)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(compression=st.sampled_from(["none", "zstd"]),
       mutations=st.dictionaries(st.integers(0, NUM - 1), mutation, max_size=NUM),
       strays=st.lists(st.tuples(st.sampled_from(["kvc-name", "hex", "tmp"]),
                                 st.binary(max_size=600)), max_size=3),
       verify=st.booleans())
@pytest.mark.timeout(120)
def test_disk_reader_never_crashes_hangs_or_serves_wrong_bytes(compression, mutations, strays,
                                                               verify):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / f"{SPEC.layout.identity}-T{SPEC.chunk_tokens}"
        root.mkdir()
        for name, data in VALID[compression].items():
            (root / name).write_bytes(data)
        for index, how in mutations.items():
            path = root / f"{KEYS[index].hex()}.kvc"
            path.write_bytes(_mutate(path.read_bytes(), how))
        for n, (kind, data) in enumerate(strays):
            name = {"kvc-name": f"zz{n}.kvc", "hex": f"{make_keys(1, seed=50 + n)[0].hex()}.kvc",
                    "tmp": f".stray{n}.1.0.tmp"}[kind]
            (root / name).write_bytes(data)
        store = build(disk=10, directory=tmp, compression=compression, verify_on_start=verify)
        try:
            for i, key in enumerate(KEYS):
                got = store.get([key])
                if got.shape[2]:
                    assert torch.equal(got, KV[:, :, i * 8:(i + 1) * 8]), f"wrong bytes for {i}"
                else:
                    assert i in mutations, f"intact chunk {i} not served"
            got = store.get(KEYS)  # several at once: a prefix of exact chunks
            n = got.shape[2]
            assert n % 8 == 0 and torch.equal(got, KV[:, :, :n])
        finally:
            store.close()
        left = {p.name for p in root.iterdir()}
        assert not any(name.endswith(".tmp") for name in left)
