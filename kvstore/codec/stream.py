"""The self-describing stream every codec writes: fixed header, section table, sections.

::

    offset  size  field
    ------  ----  ---------------------------------------------------------
         0     4  magic  b"KVC1"
         4     2  version (u16, = 2)
         6     1  codec id (u8: 0 lossless, 1 int8, 2.. the levels L0..)
         7     1  num_sections (u8, <= 8)
         8     8  layout fingerprint (u64, KVLayout.fingerprint)
        16     2  num_layers   (u16)      \
        18     2  num_kv_heads (u16)       |  the layout again, so a mismatch
        20     2  head_dim     (u16)       |  names the field that differs
        22     1  dtype code   (u8)       /
        23     1  group_size   (u8, level codecs; 0 otherwise)
        24     4  num_tokens   (u32)
        28     4  crc32 of bytes [0, 28) + section table + all sections
        32  8*n   section lengths (u64 each)
        ...       sections, back to back; their sum must equal the rest of the stream

All integers little-endian. Nothing is allocated from a length until the
lengths add up to the stream's size and the checksum matches.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from kvcluster.common.layout import KVLayout
from kvstore.codec.base import CodecError

MAGIC = b"KVC1"
VERSION = 2
MAX_SECTIONS = 8
MAX_TOKENS = 1 << 24
MAX_CHUNK_BYTES = 1 << 30
"""Largest decoded chunk accepted (1 GiB): a crafted header cannot make decode allocate more."""
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
_HEAD = struct.Struct("<4sHBBQHHHBBII")  # 32 bytes, crc last


@dataclass(frozen=True)
class StreamInfo:
    """What the header says about a stream that passed every check."""

    codec_id: int
    num_tokens: int
    group_size: int
    sections: list[memoryview]


def pack_stream(codec_id: int, layout: KVLayout, num_tokens: int, group_size: int,
                sections: list[bytes | memoryview]) -> bytes:
    """Frame ``sections`` with a header for ``layout`` (see the module picture)."""
    assert len(sections) <= MAX_SECTIONS and 0 <= num_tokens < MAX_TOKENS
    table = struct.pack(f"<{len(sections)}Q", *(len(memoryview(s).cast("B")) for s in sections))
    head = _HEAD.pack(MAGIC, VERSION, codec_id, len(sections), layout.fingerprint,
                      layout.num_layers, layout.num_kv_heads, layout.head_dim,
                      DTYPE_CODES[layout.dtype], group_size, num_tokens, 0)
    crc = zlib.crc32(head[:28])
    crc = zlib.crc32(table, crc)
    for s in sections:
        crc = zlib.crc32(s, crc)
    return b"".join([head[:28], struct.pack("<I", crc), table, *sections])


def unpack_stream(data: bytes | memoryview, layout: KVLayout, codec_id: int) -> StreamInfo:
    """Check a stream against ``layout`` and ``codec_id``; return its sections.

    Raises:
        CodecError: wrong magic/version/codec/layout, bad sizes or checksum.
    """
    view = _as_bytes_view(data)
    if len(view) < _HEAD.size:
        raise CodecError(f"stream too short: {len(view)} bytes < {_HEAD.size}-byte header")
    (magic, version, cid, num_sections, fingerprint, num_layers, kv_heads, head_dim,
     dtype_code, group_size, num_tokens, crc) = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"unsupported stream version {version}")
    _check_layout(layout, fingerprint, num_layers, kv_heads, head_dim, dtype_code)
    if cid != codec_id:
        raise CodecError(f"stream holds codec id {cid}, this codec is {codec_id}")
    if num_sections > MAX_SECTIONS or num_tokens >= MAX_TOKENS:
        raise CodecError(f"bad header: {num_sections} sections, {num_tokens} tokens")
    if layout.bytes_per_chunk(num_tokens) > MAX_CHUNK_BYTES:
        raise CodecError(f"stream claims {num_tokens} tokens, over the {MAX_CHUNK_BYTES >> 20} MiB "
                         f"decode limit for {layout.identity}")
    lengths = _section_lengths(view, num_sections)
    _check_crc(view, num_sections, crc)
    return StreamInfo(cid, num_tokens, group_size, _split(view, lengths, num_sections))


# ---------------------------------------------------------------- helpers


def _as_bytes_view(data) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError as exc:
        raise CodecError(f"stream must be bytes-like, got {type(data).__name__}") from exc
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_layout(layout, fingerprint, num_layers, kv_heads, head_dim, dtype_code) -> None:
    fields = (("num_layers", num_layers, layout.num_layers),
              ("num_kv_heads", kv_heads, layout.num_kv_heads),
              ("head_dim", head_dim, layout.head_dim),
              ("dtype code", dtype_code, DTYPE_CODES[layout.dtype]))
    for name, got, want in fields:
        if got != want:
            raise CodecError(f"stream is for another layout: {name} {got} != {want}")
    if fingerprint != layout.fingerprint:
        raise CodecError(f"stream is for another layout (fingerprint {fingerprint:#x}, "
                         f"expected {layout.fingerprint:#x} for {layout.identity})")


def _section_lengths(view: memoryview, num_sections: int) -> list[int]:
    table_end = _HEAD.size + 8 * num_sections
    if len(view) < table_end:
        raise CodecError("stream truncated inside its section table")
    lengths = list(struct.unpack_from(f"<{num_sections}Q", view, _HEAD.size))
    if sum(lengths) != len(view) - table_end:
        raise CodecError(f"section lengths add to {sum(lengths)} bytes, "
                         f"stream holds {len(view) - table_end}: truncated or padded")
    return lengths


def _check_crc(view: memoryview, num_sections: int, crc: int) -> None:
    actual = zlib.crc32(view[:28])
    actual = zlib.crc32(view[_HEAD.size:], actual)
    if actual != crc:
        raise CodecError(f"checksum mismatch: stream says {crc:#010x}, content is {actual:#010x}")


def _split(view: memoryview, lengths: list[int], num_sections: int) -> list[memoryview]:
    out, offset = [], _HEAD.size + 8 * num_sections
    for n in lengths:
        out.append(view[offset:offset + n])
        offset += n
    return out
