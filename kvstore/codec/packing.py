"""Packing int8 symbols 2 or 4 to a byte before zstd, with escapes for the rare large ones.

zstd's entropy stage is Huffman over bytes: at most 8 bits and at least 1 bit
per byte. Low-bitrate levels have symbols of ~1.3-2.3 bits of entropy, where a
1-bit floor per symbol wastes up to 30% (measured, docs/codec.md). Packing
``8 // width`` symbols into each byte lets Huffman code them jointly, and
halves or quarters the bytes zstd touches.

Codes are offset binary: symbol ``s`` is ``s + 2**(width-1)``; code 0 is the
escape, so a packed width holds ``[-(2**(width-1) - 1), 2**(width-1) - 1]``.
Escaped symbols' values follow, in order, in their own int8 array; their
positions are the escape codes themselves.
"""

from __future__ import annotations

import numpy as np

from kvstore.codec.base import CodecError

WIDTHS = (2, 4, 8)
MAX_ESCAPE_FRACTION = 0.05
"""A narrower width is used while at most this share of symbols escapes."""


def choose_width(symbols: np.ndarray) -> int:
    """The narrowest width whose escapes stay under MAX_ESCAPE_FRACTION. symbols: int8 [N]."""
    limit = MAX_ESCAPE_FRACTION * symbols.size
    magnitude = np.abs(symbols)  # int8 is safe: symbols are in [-127, 127]
    for width in WIDTHS[:-1]:
        top = (1 << (width - 1)) - 1
        if np.count_nonzero(magnitude > top) <= limit:
            return width
    return 8


def pack(symbols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 [N] -> (packed uint8 [ceil(N * width / 8)], escaped values int8 [E])."""
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


def unpack(packed: np.ndarray, num_symbols: int, width: int, escapes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack`; the escape count must match exactly (else CodecError)."""
    symbols, used = _unpack_prefix(packed, num_symbols, width, escapes)
    if used != escapes.size:
        raise CodecError(f"packed symbols: {used} escapes, {escapes.size} values")
    return symbols


def pack_groups(rows: np.ndarray, bounds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Rows ``[R, C]`` int8 packed in column groups ``bounds`` (0 = b0 < b1 < ... = C),
    each group row-major with its own width: (packed uint8, escapes int8, widths u8 each).

    With the transform (transform.py) the columns are principal axes, largest first:
    the leading ones need 8 bits, the trailing ones 4 or 2, and one width for all
    would escape or waste (measured on SmolLM2 KV: 0.06-0.24 bits/element smaller).
    """
    packed, escaped, widths = [], [], []
    for start, end in zip(bounds, bounds[1:]):
        group = np.ascontiguousarray(rows[:, start:end]).reshape(-1)  # no copy for one group
        width = choose_width(group)
        codes, values = pack(group, width)
        packed.append(codes)
        escaped.append(values)
        widths.append(width)
    return np.concatenate(packed), np.concatenate(escaped), bytes(widths)


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
    if len(bounds) == 2:
        return unpack(packed, num_rows * bounds[1], widths[0], escapes).reshape(num_rows, -1)
    rows = np.empty((num_rows, bounds[-1]), dtype=np.int8)
    offset = used = 0
    for start, end, width in zip(bounds, bounds[1:], widths):
        count = num_rows * (end - start)
        size = _group_bytes(count, width)
        group, taken = _unpack_prefix(packed[offset:offset + size], count, width, escapes[used:])
        rows[:, start:end] = group.reshape(num_rows, end - start)
        offset, used = offset + size, used + taken
    if offset != packed.size or used != escapes.size:
        raise CodecError(f"packed symbols: {offset} of {packed.size} bytes and {used} of "
                         f"{escapes.size} escapes used")
    return rows


def _group_bytes(num_symbols: int, width: int) -> int:
    return -(-num_symbols * width // 8)


def _unpack_prefix(packed: np.ndarray, num_symbols: int, width: int,
                   escapes: np.ndarray) -> tuple[np.ndarray, int]:
    """Symbols of :func:`pack`, taking their escaped values from the front of ``escapes``."""
    if width == 8:
        return packed.view(np.int8)[:num_symbols], 0
    per_byte, half = 8 // width, 1 << (width - 1)
    if packed.size != -(-num_symbols // per_byte):
        raise CodecError(f"packed symbols: {packed.size} bytes for {num_symbols} symbols")
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
