"""The bitrate levels: CacheGen-style anchor/delta + per-token quantization + zstd entropy stage.

Sections of a level stream (after the header of stream.py)::

    0  side info, one zstd frame of:
           mean [P, C] fp16 | step exponents [P, T] i16 | refs [P, T] u8 | classes [P, T] u8
    1  symbols,   one zstd frame of:  the P*T rows of C int8 symbols, in row order
                  (rows sorted by class, stable), packed `width` bits each; with a
                  transform, in column groups (transform.COLUMN_GROUPS), each group
                  row-major and packed at its own width, groups back to back
    2  escapes:   width per group (u8: 2, 4 or 8; one without a transform) |
                  one zstd frame of the escaped symbols (int8, in order)
    3  transform (only when the model profile has one, transform.py):
                  fingerprint (u64) | position of the chunk's first token (u32)

with P = num_layers * 2 planes (layer-major, K then V) and C = kv_heads * head_dim.
Row order: rows (plane, token) stably sorted by their order class (allocation.py),
so rows quantized alike are coded together; any class values are valid.
With a transform, mean, references, steps and symbols are all of the
transformed rows, and the decoder turns its reconstruction back.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.allocation import order_classes
from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.dtypes import check_chunk, torch_dtype
from kvstore.codec.hint import NO_HINT, EncodeHint
from kvstore.codec.levels import LevelSpec
from kvstore.codec.packing import check_widths, pack_groups, packed_size, unpack_groups
from kvstore.codec.profile import profile_for
from kvstore.codec.quantize import (
    MAX_EXP,
    MIN_EXP,
    Quantized,
    dequantize,
    quantize,
    refs_problem,
)
from kvstore.codec.scratch import scratch
from kvstore.codec.sections import compress, decompress, read_tensor, tensor_section
from kvstore.codec.stream import pack_stream, unpack_stream
from kvstore.codec.transform import MATMUL_DTYPE, MAX_POSITION, KVTransform, column_groups

FIRST_LEVEL_ID = 2
_TRANSFORM = struct.Struct("<QI")  # fingerprint, position


class CacheGenCodec(KVCodec):
    """One bitrate level. ``level_index`` 0 is L0, the finest."""

    def __init__(self, spec: LevelSpec, level_index: int, group_size: int = 10,
                 transform: bool = True):
        """``transform``: code in the profile's transform coordinates when it has one
        (smaller, slower: docs/codec.md); decoding reads either kind of stream."""
        if not 1 <= group_size <= 255:
            raise ValueError(f"group_size must be in [1, 255], got {group_size}")
        self.spec = spec
        self.transform = transform
        self.name = spec.name
        self.codec_id = FIRST_LEVEL_ID + level_index
        self.group_size = group_size

    def encode(self, kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> bytes:
        num_tokens = check_chunk(kv, layout, hint)
        hint = hint or NO_HINT
        x = kv.detach().cpu().reshape(_plane_shape(layout, num_tokens))  # [P, T, C]
        alphas = self.spec.row_alphas(x, layout, hint)  # [P, T]: from the untransformed keys
        transform = profile_for(layout).transform if self.transform else None
        q = quantize(x if transform is None else transform.forward(x, hint.position),
                     alphas, self.group_size)
        classes = order_classes(alphas)
        side = b"".join([tensor_section(t) for t in (q.mean, q.step_exps, q.refs, classes)])
        channels = q.symbols.shape[-1]
        rows = _gather_rows(q.symbols.view(-1, channels), _row_order(classes)).numpy()  # [P*T, C]
        packed, escapes, widths = pack_groups(rows, _column_bounds(channels, transform))
        sections = [compress(side), compress(packed), widths + compress(escapes)]
        if transform is not None:
            sections.append(_TRANSFORM.pack(transform.fingerprint, hint.position))
        return pack_stream(self.codec_id, layout, num_tokens, self.group_size, sections)

    def decode(self, data: bytes | memoryview, layout: KVLayout) -> torch.Tensor:
        info = unpack_stream(data, layout, self.codec_id)
        if len(info.sections) not in (3, 4):
            raise CodecError(f"{self.name} stream must hold 3 or 4 sections, got {len(info.sections)}")
        if info.group_size < 1:
            raise CodecError(f"{self.name} stream has group_size 0")
        transform, position = _read_transform(info.sections[3:], layout, info.num_tokens)
        bounds = _column_bounds(layout.num_kv_heads * layout.head_dim, transform)
        q, rows = _read_quantized(info.sections, _plane_shape(layout, info.num_tokens),
                                  bounds, info.group_size)
        if transform is None:
            x = dequantize(q, info.group_size, torch_dtype(layout), rows=rows)
        else:
            y = dequantize(q, info.group_size, MATMUL_DTYPE, into_scratch=True, rows=rows)
            x = transform.inverse(y, position, torch_dtype(layout))
        return x.reshape(layout.shape(info.num_tokens))


def _column_bounds(channels: int, transform: KVTransform | None) -> tuple[int, ...]:
    """Symbol column groups: one without a transform, the principal-axis groups with one."""
    return (0, channels) if transform is None else column_groups(channels)


def _plane_shape(layout: KVLayout, num_tokens: int) -> tuple[int, int, int]:
    return (layout.num_layers * 2, num_tokens, layout.num_kv_heads * layout.head_dim)


def _read_quantized(sections, shape: tuple[int, int, int], bounds: tuple[int, ...],
                    group_size: int) -> tuple[Quantized, torch.Tensor]:
    """The stream's tensors, symbols ``[P * T, C]`` in stream order, and where each
    plane-major row lies in it (for dequantize's ``rows``)."""
    planes, tokens, channels = shape
    mean, exps, refs, classes = _read_side_info(sections[0], planes, tokens, channels)
    _check_side_info(mean, exps, refs, group_size)
    ordered = torch.from_numpy(_read_symbols(sections[1], sections[2], planes * tokens, bounds))
    order = _row_order(classes)
    where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return Quantized(mean, exps, refs, ordered), where


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


def _read_transform(sections, layout: KVLayout, num_tokens: int) -> tuple[KVTransform | None, int]:
    """The transform a stream names (None if it has no transform section) and its position."""
    if not sections:
        return None, 0
    if len(sections[0]) != _TRANSFORM.size:
        raise CodecError(f"transform section is {len(sections[0])} bytes, not {_TRANSFORM.size}")
    fingerprint, position = _TRANSFORM.unpack(sections[0])
    transform = profile_for(layout).transform
    if transform is None or transform.fingerprint != fingerprint:
        have = "none" if transform is None else f"{transform.fingerprint:016x}"
        raise CodecError(f"stream was coded with transform {fingerprint:016x}; this decoder's "
                         f"profile for {layout.identity} has {have}")
    if position + num_tokens > MAX_POSITION:
        raise CodecError(f"stream position {position} + {num_tokens} tokens is out of range")
    return transform, position


def _gather_rows(symbols: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``symbols[order]`` for int8 rows ``[R, C]``: as 8-byte words when rows allow it (torch's
    int8 gather is several times slower than its int64 one), into a scratch buffer."""
    words = symbols.view(torch.int64) if symbols.shape[1] % 8 == 0 else symbols
    out = scratch("ordered_rows", (order.numel(), words.shape[1]), words.dtype)
    return torch.index_select(words, 0, order, out=out).view(torch.int8)


def _row_order(classes: torch.Tensor) -> torch.Tensor:
    """Rows (plane-major) in the order their symbols are written: by class, stable."""
    return torch.sort(classes.view(-1), stable=True).indices


def _read_symbols(packed_section, escape_section, num_rows: int, bounds: tuple[int, ...]) -> np.ndarray:
    num_groups = len(bounds) - 1
    if len(escape_section) < num_groups:
        raise CodecError("escapes section lacks its symbol widths")
    widths = bytes(escape_section[:num_groups])
    check_widths(widths, num_groups)  # before sizes derived from them allocate anything
    size = packed_size(num_rows, bounds, widths)
    packed = np.frombuffer(decompress(packed_section, size, "symbols"), dtype=np.uint8)
    escapes = decompress(escape_section[num_groups:], num_rows * bounds[-1], "escapes", at_most=True)
    rows = unpack_groups(packed, np.frombuffer(escapes, dtype=np.int8), widths, num_rows, bounds)
    return rows if rows.flags.writeable else rows.copy()


def _check_side_info(mean, exps, refs, group_size: int) -> None:
    """A stream that passed its checksum can still be hand-made: refuse nonsense values."""
    problem = refs_problem(refs, group_size)
    if problem is not None:
        raise CodecError(problem)
    if not bool(torch.isfinite(mean).all()):
        raise CodecError("side info holds non-finite means")
    if bool(((exps < MIN_EXP) | (exps > MAX_EXP)).any()):
        raise CodecError("side info holds step exponents out of range")
