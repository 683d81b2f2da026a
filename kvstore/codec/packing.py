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
    if width == 8:
        return packed.view(np.int8)[:num_symbols]
    per_byte, half = 8 // width, 1 << (width - 1)
    if packed.size != -(-num_symbols // per_byte):
        raise CodecError(f"packed symbols: {packed.size} bytes for {num_symbols} symbols")
    lanes = np.empty((packed.size, per_byte), dtype=np.uint8)
    mask = np.uint8((1 << width) - 1)
    for j in range(per_byte):
        np.bitwise_and(packed >> np.uint8(width * j), mask, out=lanes[:, j])
    codes = lanes.reshape(-1)[:num_symbols]
    positions = np.flatnonzero(codes == 0)
    if positions.size != escapes.size:
        raise CodecError(f"packed symbols: {positions.size} escapes, {escapes.size} values")
    symbols = (codes.view(np.int8) - np.int8(half)).astype(np.int8, copy=False)
    symbols[positions] = escapes
    return symbols
