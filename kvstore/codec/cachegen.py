"""The bitrate levels: CacheGen-style anchor/delta + per-token quantization + zstd entropy stage.

Sections of a level stream (after the header of stream.py)::

    0  side info, one zstd frame of:
           mean [P, C] fp16 | step exponents [P, T] i16 | refs [P, T] u8 | classes [P, T] u8
    1  symbols,   one zstd frame of:  the P*T rows of C int8 symbols, in row order
                  (rows sorted by class, stable), packed `width` bits each
    2  escapes:   width (u8: 2, 4 or 8) | one zstd frame of the escaped symbols (int8, in order)

with P = num_layers * 2 planes (layer-major, K then V) and C = kv_heads * head_dim.
Row order: rows (plane, token) stably sorted by their order class (allocation.py),
so rows quantized alike are coded together; any class values are valid.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.allocation import order_classes
from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.dtypes import check_chunk, torch_dtype
from kvstore.codec.hint import NO_HINT, EncodeHint
from kvstore.codec.levels import LevelSpec
from kvstore.codec.packing import WIDTHS, choose_width, pack, unpack
from kvstore.codec.quantize import (
    MAX_EXP,
    MIN_EXP,
    REF_ANCHOR,
    Quantized,
    dequantize,
    quantize,
)
from kvstore.codec.sections import compress, decompress, read_tensor, tensor_section
from kvstore.codec.stream import pack_stream, unpack_stream

FIRST_LEVEL_ID = 2


class CacheGenCodec(KVCodec):
    """One bitrate level. ``level_index`` 0 is L0, the finest."""

    def __init__(self, spec: LevelSpec, level_index: int, group_size: int = 10):
        if not 1 <= group_size <= 255:
            raise ValueError(f"group_size must be in [1, 255], got {group_size}")
        self.spec = spec
        self.name = spec.name
        self.codec_id = FIRST_LEVEL_ID + level_index
        self.group_size = group_size

    def encode(self, kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> bytes:
        num_tokens = check_chunk(kv, layout, hint)
        x = kv.detach().cpu().reshape(_plane_shape(layout, num_tokens))  # [P, T, C]
        alphas = self.spec.row_alphas(x, layout, hint or NO_HINT)  # [P, T]
        q = quantize(x, alphas, self.group_size)
        classes = order_classes(alphas)
        side = b"".join([tensor_section(t) for t in (q.mean, q.step_exps, q.refs, classes)])
        rows = q.symbols.view(-1, q.symbols.shape[-1])  # [P * T, C]
        symbols = rows.index_select(0, _row_order(classes)).numpy().reshape(-1)
        width = choose_width(symbols)
        packed, escapes = pack(symbols, width)
        sections = [compress(side), compress(packed), bytes([width]) + compress(escapes)]
        return pack_stream(self.codec_id, layout, num_tokens, self.group_size, sections)

    def decode(self, data: bytes | memoryview, layout: KVLayout) -> torch.Tensor:
        info = unpack_stream(data, layout, self.codec_id)
        if len(info.sections) != 3:
            raise CodecError(f"{self.name} stream must hold 3 sections, got {len(info.sections)}")
        if info.group_size < 1:
            raise CodecError(f"{self.name} stream has group_size 0")
        q = _read_quantized(info.sections, _plane_shape(layout, info.num_tokens))
        x = dequantize(q, info.group_size, torch_dtype(layout))
        return x.reshape(layout.shape(info.num_tokens))


def _plane_shape(layout: KVLayout, num_tokens: int) -> tuple[int, int, int]:
    return (layout.num_layers * 2, num_tokens, layout.num_kv_heads * layout.head_dim)


def _read_quantized(sections, shape: tuple[int, int, int]) -> Quantized:
    planes, tokens, channels = shape
    mean, exps, refs, classes = _read_side_info(sections[0], planes, tokens, channels)
    _check_side_info(mean, exps, refs)
    ordered = torch.from_numpy(_read_symbols(sections[1], sections[2], planes * tokens * channels))
    order = _row_order(classes)
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    symbols = ordered.view(-1, channels).index_select(0, where)  # a gather: faster than index_copy_
    return Quantized(mean, exps, refs, symbols.view(shape))


def _read_side_info(section, planes: int, tokens: int, channels: int):
    sizes = [planes * channels * 2, planes * tokens * 2, planes * tokens, planes * tokens]
    side = decompress(section, sum(sizes), "side info")
    parts, offset = [], 0
    for size in sizes:
        parts.append(side[offset:offset + size])
        offset += size
    return (read_tensor(parts[0], torch.float16, (planes, channels), "means"),
            read_tensor(parts[1], torch.int16, (planes, tokens), "step exponents"),
            read_tensor(parts[2], torch.uint8, (planes, tokens), "refs"),
            read_tensor(parts[3], torch.uint8, (planes, tokens), "classes"))


def _row_order(classes: torch.Tensor) -> torch.Tensor:
    """Rows (plane-major) in the order their symbols are written: by class, stable."""
    return torch.sort(classes.view(-1), stable=True).indices


def _read_symbols(packed_section, escape_section, num_symbols: int) -> np.ndarray:
    if len(escape_section) < 1 or escape_section[0] not in WIDTHS:
        raise CodecError("escapes section lacks a valid symbol width")
    width = escape_section[0]
    packed_size = -(-num_symbols * width // 8)
    packed = np.frombuffer(decompress(packed_section, packed_size, "symbols"), dtype=np.uint8)
    escapes = decompress(escape_section[1:], num_symbols, "escapes", at_most=True)
    symbols = unpack(packed, num_symbols, width, np.frombuffer(escapes, dtype=np.int8))
    return symbols if symbols.flags.writeable else symbols.copy()


def _check_side_info(mean, exps, refs) -> None:
    """A stream that passed its checksum can still be hand-made: refuse nonsense values."""
    if bool((refs > REF_ANCHOR).any()):
        raise CodecError("refs section holds an unknown reference kind")
    if not bool(torch.isfinite(mean).all()):
        raise CodecError("side info holds non-finite means")
    if bool(((exps < MIN_EXP) | (exps > MAX_EXP)).any()):
        raise CodecError("side info holds step exponents out of range")
