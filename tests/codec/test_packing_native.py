"""Symbol packing in C (kvstore/codec/native/packing.c) against its numpy twin.

Same symbols, same bytes: packed bytes, escapes and widths from pack_groups and
pack, rows from unpack_groups and unpack, on many shapes (groups that are not a
whole number of bytes a row, odd row counts, several C chunks) and
distributions (no escapes, all escapes, shares either side of the 5% rule).
Corrupt input raises CodecError on both paths and never reads out of bounds.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec import CodecError, EncodeHint, get_codec
from kvstore.codec.native import packing_lib
from kvstore.codec.packing import (MAX_ESCAPE_FRACTION, pack, pack_groups, packed_size, unpack,
                                   unpack_groups)
from tests.codec.conftest import LAYOUT, structured_kv

PATHS = ["numpy", "native"]
DISTRIBUTIONS = ["zero", "tiny", "small", "wide", "all_escape", "mixed"]
BOUNDS = [(0, 3, 7, 13), (0, 1), (0, 13), (0, 4, 8), (0, 8, 32, 96, 192), (0, 2, 5, 6, 11)]
native_only = pytest.mark.skipif(not packing_lib.available(), reason="no C compiler for packing.c")


@contextlib.contextmanager
def on_path(path: str):
    """Run the block on the numpy twin or in C (skips where C is unavailable)."""
    if path == "native":
        if not packing_lib.available():
            pytest.skip("no C compiler for packing.c")
        yield
    else:
        with mock.patch.object(packing_lib, "available", return_value=False):
            yield


def both_paths(fn):
    """``fn()`` on numpy, then in C: the two results."""
    with on_path("numpy"):
        reference = fn()
    with on_path("native"):
        return reference, fn()


def symbols(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """int8 symbols in [-127, 127] whose escape share suits widths 2, 4 or 8 (or straddles)."""
    if kind == "zero":
        return np.zeros(shape, dtype=np.int8)
    if kind == "all_escape":  # every symbol escapes at widths 2 and 4
        return (rng.choice([-1, 1], shape) * rng.integers(8, 128, shape)).astype(np.int8)
    if kind == "mixed":  # each column its own scale: widths differ by group
        scales = rng.choice([0, 1, 3, 9, 40], shape[-1])
        return np.clip(np.rint(rng.laplace(0, 1, shape) * scales), -127, 127).astype(np.int8)
    scale = {"tiny": 0.4, "small": 2.5, "wide": 60.0}[kind]
    return np.clip(np.rint(rng.laplace(0, scale, shape)), -127, 127).astype(np.int8)


def assert_same_packing(reference, native):
    (packed0, escapes0, widths0), (packed1, escapes1, widths1) = reference, native
    assert widths1 == widths0
    assert packed1.dtype == packed0.dtype == np.uint8
    assert escapes1.dtype == escapes0.dtype == np.int8
    assert np.array_equal(packed1, packed0)
    assert np.array_equal(escapes1, escapes0)


# ------------------------------------------------------------ same bytes


@native_only
@settings(max_examples=150, deadline=None)
@given(num_rows=st.integers(0, 70), bounds=st.sampled_from(BOUNDS),
       kind=st.sampled_from(DISTRIBUTIONS), seed=st.integers(0, 2**32 - 1))
def test_pack_groups_matches_numpy(num_rows, bounds, kind, seed):
    rows = symbols(np.random.default_rng(seed), (num_rows, bounds[-1]), kind)
    reference, native = both_paths(lambda: pack_groups(rows, bounds))
    assert_same_packing(reference, native)
    for path in PATHS:
        with on_path(path):
            assert np.array_equal(unpack_groups(*native[:2], native[2], num_rows, bounds), rows)


@native_only
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6, unique=True),
       num_rows=st.integers(1, 400), kind=st.sampled_from(DISTRIBUTIONS),
       seed=st.integers(0, 2**32 - 1))
def test_random_bounds_match_numpy(cuts, num_rows, kind, seed):
    bounds = (0, *sorted(cuts))
    rows = symbols(np.random.default_rng(seed), (num_rows, bounds[-1]), kind)
    reference, native = both_paths(lambda: pack_groups(rows, bounds))
    assert_same_packing(reference, native)
    assert np.array_equal(unpack_groups(*native[:2], native[2], num_rows, bounds), rows)


@native_only
@pytest.mark.parametrize("num_rows,bounds", [(2001, (0, 3, 7, 13)), (999, (0, 13)),
                                             (1537, (0, 8, 32, 96, 192)), (4099, (0, 1, 2))])
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
def test_many_chunks_match_numpy(num_rows, bounds, kind):
    """Groups of several C chunks, chunks that end mid-row, tails that end mid-byte."""
    rows = symbols(np.random.default_rng(num_rows), (num_rows, bounds[-1]), kind)
    reference, native = both_paths(lambda: pack_groups(rows, bounds))
    assert_same_packing(reference, native)
    decoded = both_paths(lambda: unpack_groups(*native[:2], native[2], num_rows, bounds))
    assert np.array_equal(decoded[0], rows) and np.array_equal(decoded[1], rows)


@native_only
@pytest.mark.parametrize("width,magnitude", [(2, 1), (4, 7)])
@pytest.mark.parametrize("extra", [0, 1])
def test_escape_share_at_the_limit(width, magnitude, extra):
    """Exactly 5% escapes keeps the narrow width; one more escape widens it, on both paths."""
    num_rows, cols = 1000, 7
    limit = int(MAX_ESCAPE_FRACTION * num_rows * cols)
    rows = np.full((num_rows, cols), 0 if width == 2 else 3, dtype=np.int8)  # 3: escapes at 2
    rows.reshape(-1)[:: (num_rows * cols) // (limit + extra)][: limit + extra] = magnitude + 1
    reference, native = both_paths(lambda: pack_groups(rows, (0, cols)))
    assert_same_packing(reference, native)
    assert native[2] == bytes([width if extra == 0 else (4 if width == 2 else 8)])


@native_only
@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(-128, 127), min_size=0, max_size=300),
       width=st.sampled_from([2, 4, 8]))
def test_pack_matches_numpy_on_every_int8(values, width):
    """Even -128, which the quantizer never writes, packs to numpy's bytes."""
    data = np.array(values, dtype=np.int8)
    reference, native = both_paths(lambda: pack(data, width))
    assert np.array_equal(native[0], reference[0]) and np.array_equal(native[1], reference[1])
    if -128 not in values:
        decoded = both_paths(lambda: unpack(native[0], data.size, width, native[1]))
        assert np.array_equal(decoded[0], data) and np.array_equal(decoded[1], data)


@native_only
@pytest.mark.parametrize("transform", [True, False])
@pytest.mark.parametrize("level", ["L0", "L3", "L6"])
def test_codec_streams_match_numpy(level, transform):
    kv = structured_kv(LAYOUT, 200)
    codec = get_codec(level, transform=transform)
    streams = both_paths(lambda: codec.encode(kv, LAYOUT, EncodeHint(position=64)))
    assert streams[1] == streams[0]
    decoded = both_paths(lambda: codec.decode(streams[1], LAYOUT))
    assert bool((decoded[1] == decoded[0]).all())


# ------------------------------------------------------------ corrupt input


def _packed_example():
    rows = symbols(np.random.default_rng(3), (51, 13), "mixed")
    rows[:, 7:] = symbols(np.random.default_rng(4), (51, 6), "small")
    with on_path("numpy"):
        packed, escapes, widths = pack_groups(rows, BOUNDS[0])
    assert escapes.size > 2 and 4 in widths
    return packed, escapes, widths, 51, BOUNDS[0]


@pytest.mark.parametrize("path", PATHS)
def test_too_few_escapes_raise(path):
    packed, escapes, widths, num_rows, bounds = _packed_example()
    with on_path(path), pytest.raises(CodecError, match="escapes"):
        unpack_groups(packed, escapes[:-1], widths, num_rows, bounds)
    with on_path(path), pytest.raises(CodecError, match="escapes"):
        unpack_groups(packed, escapes[:0], widths, num_rows, bounds)


@pytest.mark.parametrize("path", PATHS)
def test_too_many_escapes_raise(path):
    packed, escapes, widths, num_rows, bounds = _packed_example()
    with on_path(path), pytest.raises(CodecError, match="escapes"):
        unpack_groups(packed, np.append(escapes, np.int8(5)), widths, num_rows, bounds)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("delta", [-1, 1, -40])
def test_wrong_byte_count_raises(path, delta):
    packed, escapes, widths, num_rows, bounds = _packed_example()
    wrong = np.zeros(packed.size + delta, dtype=np.uint8)
    wrong[: min(packed.size, wrong.size)] = packed[: wrong.size]
    with on_path(path), pytest.raises(CodecError, match="bytes"):
        unpack_groups(wrong, escapes, widths, num_rows, bounds)
    with on_path(path), pytest.raises(CodecError, match="bytes"):  # width 8 too: no short view
        unpack(np.zeros(10 + np.sign(delta), dtype=np.uint8), 10, 8, escapes[:0])


@pytest.mark.parametrize("path", PATHS)
def test_bad_widths_raise(path):
    packed, escapes, _, num_rows, bounds = _packed_example()
    for widths in (b"\x04\x04", b"\x04\x03\x04", b"\x04\x04\x04\x04"):
        with on_path(path), pytest.raises(CodecError, match="widths"):
            unpack_groups(packed, escapes, widths, num_rows, bounds)


@native_only
@settings(max_examples=150, deadline=None)
@given(num_rows=st.integers(0, 60), bounds=st.sampled_from(BOUNDS),
       widths=st.lists(st.sampled_from([2, 4, 8]), min_size=5, max_size=5),
       num_escapes=st.integers(0, 400), seed=st.integers(0, 2**32 - 1))
def test_random_streams_agree(num_rows, bounds, widths, num_escapes, seed):
    """Random bytes and escape lists: both paths decode the same rows or both refuse."""
    widths = bytes(widths[: len(bounds) - 1])
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, packed_size(num_rows, bounds, widths), dtype=np.uint8)
    escapes = rng.integers(-127, 128, num_escapes, dtype=np.int8)
    outcomes = []
    for path in PATHS:
        with on_path(path):
            try:
                outcomes.append(unpack_groups(packed, escapes, widths, num_rows, bounds))
            except CodecError:
                outcomes.append(None)
    assert (outcomes[0] is None) == (outcomes[1] is None)
    if outcomes[0] is not None:
        assert np.array_equal(outcomes[0], outcomes[1])


@native_only
def test_kernel_stops_at_the_end_of_its_buffers():
    """C reports a short escape list or escape room instead of going past it."""
    rows = np.full((9, 5), 100, dtype=np.int8)  # every symbol escapes at width 4
    packed = np.empty(packed_size(9, (0, 5), b"\x04"), dtype=np.uint8)
    room = np.zeros(44, dtype=np.int8)
    assert packing_lib.pack_group(rows, 0, 5, 4, packed, room) == packing_lib.ERR_ESCAPES
    escapes = np.full(45, 100, dtype=np.int8)
    assert packing_lib.pack_group(rows, 0, 5, 4, packed, escapes) == 45
    out = np.zeros((9, 5), dtype=np.int8)
    assert packing_lib.unpack_group(packed, escapes[:44], 4, out, 0, 5) == packing_lib.ERR_ESCAPES
    assert packing_lib.unpack_group(packed, escapes, 4, out, 0, 5) == 45
    assert np.array_equal(out, rows)
