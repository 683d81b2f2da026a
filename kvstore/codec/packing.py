"""Packing int8 symbols 2 or 4 to a byte before zstd, with escapes for the rare large ones.

zstd's entropy stage is Huffman over bytes: at most 8 bits and at least 1 bit
per byte. Low-bitrate levels have symbols of only a few bits of entropy, where a
1-bit floor per symbol wastes a large share (measured, docs/codec.md). Packing
``8 // width`` symbols into each byte lets Huffman code them jointly, and
halves or quarters the bytes zstd touches.

Codes are offset binary: symbol ``s`` is ``s + 2**(width-1)``; code 0 is the
escape, so a packed width holds ``[-(2**(width-1) - 1), 2**(width-1) - 1]``.
Escaped symbols' values follow, in order, in their own int8 array; their
positions are the escape codes themselves.

Speed: with the codec kernels loaded (kvstore/codec/native/packing.c, switched
off by ``KVSTORE_CODEC_NATIVE=0``) packing and unpacking run in C, one pass
over the symbols instead of numpy's several full-size ones
(docs/codec.md, "Measurements behind the code").
The numpy code stays as the fallback and the reference: both give the same
bytes, widths and rows (tests/codec/test_packing_native.py).
"""

from __future__ import annotations

import numpy as np

from kvstore.codec.base import CodecError
from kvstore.codec.native import packing_lib

WIDTHS = (2, 4, 8)
MAX_ESCAPE_FRACTION = 0.05
"""A narrower width is used while at most this share of symbols escapes."""


def choose_width(symbols: np.ndarray) -> int:
    """The narrowest width whose escapes stay under MAX_ESCAPE_FRACTION. symbols: int8 [N]."""
    magnitude = np.abs(symbols)  # int8 is safe: symbols are in [-127, 127]
    counts = (np.count_nonzero(magnitude > _top(width)) for width in WIDTHS[:-1])  # lazy
    return _narrowest(counts, symbols.size)


def pack(symbols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 [N] -> (packed uint8 [ceil(N * width / 8)], escaped values int8 [E])."""
    if width == 8 or not packing_lib.available():
        return _pack_numpy(symbols, width)
    packed = np.empty(_group_bytes(symbols.size, width), dtype=np.uint8)
    escapes = np.empty(symbols.size, dtype=np.int8)
    count = packing_lib.pack_group(np.ascontiguousarray(symbols).reshape(1, -1), 0, symbols.size,
                                   width, packed, escapes)
    return packed, escapes[:count].copy()


def unpack(packed: np.ndarray, num_symbols: int, width: int, escapes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack`; the escape count must match exactly (else CodecError)."""
    return unpack_groups(packed, escapes, bytes([width]), 1, (0, num_symbols)).reshape(-1)


def pack_groups(rows: np.ndarray, bounds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Rows ``[R, C]`` int8 packed in column groups ``bounds`` (0 = b0 < b1 < ... = C),
    each group row-major with its own width: (packed uint8, escapes int8, widths u8 each).

    With the transform (transform.py) the columns are principal axes, largest first:
    the leading ones need 8 bits, the trailing ones 4 or 2, and one width for all
    would escape or waste (measured in docs/codec.md, "The level codecs").
    """
    if packing_lib.available():
        return _pack_groups_native(np.ascontiguousarray(rows), bounds)
    return _pack_groups_numpy(rows, bounds)


def check_widths(widths: bytes, num_groups: int) -> None:
    """CodecError unless ``widths`` holds one of WIDTHS per group."""
    if len(widths) != num_groups or any(w not in WIDTHS for w in widths):
        raise CodecError(f"symbol widths {list(widths)} are not one of {WIDTHS} per group")


def packed_size(num_rows: int, bounds: tuple[int, ...], widths: bytes) -> int:
    """Bytes :func:`pack_groups` writes for ``num_rows`` rows at ``widths``."""
    return sum(_group_bytes(num_rows * (end - start), width)
               for start, end, width in zip(bounds, bounds[1:], widths))


def unpack_groups(packed: np.ndarray, escapes: np.ndarray, widths: bytes, num_rows: int,
                  bounds: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_groups`: rows ``[R, C]`` int8 (CodecError if inconsistent)."""
    check_widths(widths, len(bounds) - 1)
    size = packed_size(num_rows, bounds, widths)
    if packed.size != size:
        raise CodecError(f"packed symbols: {packed.size} bytes, {size} expected")
    if len(bounds) == 2 and widths[0] == 8:  # the bytes are the symbols: no copy
        _check_all_used(0, escapes)
        return packed.view(np.int8).reshape(num_rows, bounds[-1])
    if packing_lib.available():
        return _unpack_groups_native(np.ascontiguousarray(packed, dtype=np.uint8),
                                     np.ascontiguousarray(escapes, dtype=np.int8),
                                     widths, num_rows, bounds)
    return _unpack_groups_numpy(packed, escapes, widths, num_rows, bounds)


# ---------------------------------------------------------------------- private


def _top(width: int) -> int:
    """The largest magnitude a width holds without an escape."""
    return (1 << (width - 1)) - 1


def _narrowest(escape_counts, num_symbols: int) -> int:
    """The first of WIDTHS[:-1] whose escape count (in that order) is within the share, else 8."""
    limit = MAX_ESCAPE_FRACTION * num_symbols
    for width, count in zip(WIDTHS[:-1], escape_counts):
        if count <= limit:
            return width
    return 8


def _group_bytes(num_symbols: int, width: int) -> int:
    return -(-num_symbols * width // 8)


def _check_all_used(used: int, escapes: np.ndarray) -> None:
    if used != escapes.size:
        raise CodecError(f"packed symbols: {used} of {escapes.size} escapes used")


# -------------------------------------------------------- native (packing.c)


def _pack_groups_native(rows: np.ndarray,
                        bounds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """:func:`pack_groups` in C: one pass counts every column's escapes, one packs each group."""
    groups = list(zip(bounds, bounds[1:]))
    counts = packing_lib.escape_counts(rows)  # [2, C]: escapes at widths 2 and 4
    by_group = [counts[:, start:end].sum(axis=1).tolist() + [0] for start, end in groups]
    widths = bytes(_narrowest(escaping, len(rows) * (end - start))
                   for escaping, (start, end) in zip(by_group, groups))
    packed = np.empty(packed_size(len(rows), bounds, widths), dtype=np.uint8)
    escapes = np.empty(sum(escaping[WIDTHS.index(width)]
                           for escaping, width in zip(by_group, widths)), dtype=np.int8)
    offset = used = 0
    for (start, end), width in zip(groups, widths):
        size = _group_bytes(len(rows) * (end - start), width)
        count = packing_lib.pack_group(rows, start, end, width, packed[offset:offset + size],
                                       escapes[used:])
        assert count >= 0, count  # the counts above sized escapes exactly
        offset, used = offset + size, used + count
    assert used == escapes.size, (used, escapes.size)
    return packed, escapes, widths


def _unpack_groups_native(packed: np.ndarray, escapes: np.ndarray, widths: bytes, num_rows: int,
                          bounds: tuple[int, ...]) -> np.ndarray:
    rows = np.empty((num_rows, bounds[-1]), dtype=np.int8)
    offset = used = 0
    for start, end, width in zip(bounds, bounds[1:], widths):
        size = _group_bytes(num_rows * (end - start), width)
        taken = packing_lib.unpack_group(packed[offset:offset + size], escapes[used:], width,
                                         rows, start, end)
        if taken < 0:
            raise CodecError(f"packed symbols: more escapes than the {escapes.size} values")
        offset, used = offset + size, used + taken
    _check_all_used(used, escapes)
    return rows


# ----------------------------------------------------- numpy (the reference)


def _pack_groups_numpy(rows: np.ndarray,
                       bounds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bytes]:
    packed, escaped, widths = [], [], []
    for start, end in zip(bounds, bounds[1:]):
        group = np.ascontiguousarray(rows[:, start:end]).reshape(-1)  # no copy for one group
        width = choose_width(group)
        codes, values = _pack_numpy(group, width)
        packed.append(codes)
        escaped.append(values)
        widths.append(width)
    return np.concatenate(packed), np.concatenate(escaped), bytes(widths)


def _pack_numpy(symbols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    if width == 8:
        return symbols.view(np.uint8), np.empty(0, dtype=np.int8)
    per_byte, half = 8 // width, 1 << (width - 1)
    escaped = np.abs(symbols) >= half  # int8 is safe: symbols are in [-127, 127]
    padded = np.full(-(-symbols.size // per_byte) * per_byte, half, dtype=np.uint8)
    codes = padded[: symbols.size]
    np.add(symbols.view(np.uint8), np.uint8(half), out=codes)  # wraps only for escapes
    codes[escaped] = 0
    lanes = padded.reshape(-1, per_byte)
    packed = lanes[:, 0].copy()
    for j in range(1, per_byte):
        packed |= lanes[:, j] << np.uint8(width * j)
    return packed, symbols[escaped]


def _unpack_groups_numpy(packed: np.ndarray, escapes: np.ndarray, widths: bytes, num_rows: int,
                         bounds: tuple[int, ...]) -> np.ndarray:
    """:func:`unpack_groups` once the byte count is checked (and not one width-8 group)."""
    if len(bounds) == 2:  # one group: its symbols are the rows, no copy into them
        symbols, used = _unpack_prefix(packed, num_rows * bounds[1], widths[0], escapes)
        _check_all_used(used, escapes)
        return symbols.reshape(num_rows, bounds[-1])
    rows = np.empty((num_rows, bounds[-1]), dtype=np.int8)
    offset = used = 0
    for start, end, width in zip(bounds, bounds[1:], widths):
        count = num_rows * (end - start)
        size = _group_bytes(count, width)
        group, taken = _unpack_prefix(packed[offset:offset + size], count, width, escapes[used:])
        rows[:, start:end] = group.reshape(num_rows, end - start)
        offset, used = offset + size, used + taken
    _check_all_used(used, escapes)
    return rows


def _unpack_prefix(packed: np.ndarray, num_symbols: int, width: int,
                   escapes: np.ndarray) -> tuple[np.ndarray, int]:
    """Symbols of :func:`pack` from exactly their bytes, taking their escaped values from
    the front of ``escapes``."""
    if width == 8:
        return packed.view(np.int8), 0
    per_byte, half = 8 // width, 1 << (width - 1)
    lanes = np.empty((packed.size, per_byte), dtype=np.uint8)
    mask = np.uint8((1 << width) - 1)
    for j in range(per_byte):
        np.bitwise_and(packed >> np.uint8(width * j), mask, out=lanes[:, j])
    codes = lanes.reshape(-1)[:num_symbols]
    positions = np.flatnonzero(codes == 0)
    if positions.size > escapes.size:
        raise CodecError(f"packed symbols: {positions.size} escapes, {escapes.size} values")
    symbols = (codes.view(np.int8) - np.int8(half)).astype(np.int8, copy=False)
    symbols[positions] = escapes[:positions.size]
    return symbols, positions.size
