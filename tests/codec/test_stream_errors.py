"""Decoding anything but a valid stream for this layout and level raises CodecError.

Never a crash, a hang, another exception type, or a wrong tensor.
"""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcluster.common.layout import KVLayout
from kvstore.codec import CodecError, get_codec, level_names
from kvstore.codec.stream import MAGIC
from tests.codec.conftest import LAYOUT, structured_kv, with_valid_crc

NAMES = level_names()
KV = structured_kv(num_tokens=23)
STREAMS = {name: get_codec(name).encode(KV, LAYOUT) for name in NAMES}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("name", NAMES)
def test_stream_header_says_what_it_is(name):
    stream = STREAMS[name]
    assert stream[:4] == MAGIC
    assert struct.unpack_from("<Q", stream, 8)[0] == LAYOUT.fingerprint
    assert struct.unpack_from("<I", stream, 24)[0] == 23  # num_tokens
    out = get_codec(name).decode(memoryview(bytearray(stream)), LAYOUT)  # any buffer works
    assert torch.equal(out, get_codec(name).decode(stream, LAYOUT))


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_is_rejected(name):
    stream = STREAMS[name]
    codec = get_codec(name)
    for cut in sorted({0, 1, 4, 31, 32, 33, len(stream) // 2, len(stream) - 1}):
        with pytest.raises(CodecError):
            codec.decode(stream[:cut], LAYOUT)
    with pytest.raises(CodecError):
        codec.decode(stream + b"\0", LAYOUT)


@pytest.mark.parametrize("name", NAMES)
def test_other_layout_is_rejected(name):
    codec = get_codec(name)
    others = [KVLayout(4, 2, 16, 16, "float16"),  # same shapes, other block size
              KVLayout(5, 2, 16, 8, "float16"), LAYOUT.with_dtype("bfloat16")]
    for other in others:
        with pytest.raises(CodecError, match="another layout"):
            codec.decode(STREAMS[name], other)


def test_other_level_is_rejected():
    for name in NAMES:
        for other in NAMES:
            if other != name:
                with pytest.raises(CodecError, match="codec id"):
                    get_codec(other).decode(STREAMS[name], LAYOUT)


def test_version_1_streams_are_rejected():
    """Version 2 changed the level sections (step exponents, row classes): old streams must not decode."""
    for name in NAMES:
        old = bytearray(STREAMS[name])
        struct.pack_into("<H", old, 4, 1)
        with pytest.raises(CodecError, match="unsupported stream version 1"):
            get_codec(name).decode(with_valid_crc(bytes(old)), LAYOUT)


def test_not_bytes_is_rejected():
    with pytest.raises(CodecError):
        get_codec("L0").decode("not bytes", LAYOUT)  # type: ignore[arg-type]


@FAST
@given(data=st.binary(max_size=400), name=st.sampled_from(NAMES))
def test_random_bytes_raise_codec_error(data, name):
    with pytest.raises(CodecError):
        get_codec(name).decode(data, LAYOUT)


@FAST
@given(data=st.binary(min_size=1, max_size=200), name=st.sampled_from(NAMES))
def test_random_bytes_after_a_valid_header_raise_codec_error(data, name):
    with pytest.raises(CodecError):
        get_codec(name).decode(STREAMS[name][:32] + data, LAYOUT)


@FAST
@given(name=st.sampled_from(NAMES), pos=st.integers(min_value=0), bit=st.integers(0, 7),
       extra=st.integers(0, 255))
def test_mutated_streams_raise_codec_error_or_decode_exactly(name, pos, bit, extra):
    stream = bytearray(STREAMS[name])
    pos %= len(stream)
    stream[pos] ^= 1 << bit
    stream[(pos * 7 + extra) % len(stream)] ^= extra
    _decode_or_codec_error(name, bytes(stream))


@FAST
@given(name=st.sampled_from(NAMES), pos=st.integers(min_value=0), value=st.integers(0, 255))
def test_mutations_with_a_recomputed_checksum_never_crash(name, pos, value):
    """A hand-made stream with a valid crc decodes to what it says, or raises CodecError.

    (Its content changed on purpose, so the tensor may differ; it must still be
    a tensor of the layout's shape and dtype, never a crash or another error.)
    """
    stream = bytearray(STREAMS[name])
    stream[pos % len(stream)] = value
    try:
        out = get_codec(name).decode(with_valid_crc(bytes(stream)), LAYOUT)
    except CodecError:
        return
    assert out.shape == KV.shape and out.dtype == KV.dtype


def test_crafted_stream_with_bad_side_info_is_rejected():
    """Valid checksum, valid sizes, but a step exponent out of range: CodecError, not a wrong tensor."""
    from kvstore.codec.sections import compress, decompress
    from kvstore.codec.stream import pack_stream, unpack_stream

    codec = get_codec("L1")
    info = unpack_stream(STREAMS["L1"], LAYOUT, codec.codec_id)
    side = bytearray(decompress(info.sections[0], _side_size(23), "side"))
    planes, channels = LAYOUT.num_layers * 2, LAYOUT.num_kv_heads * LAYOUT.head_dim
    side[planes * channels * 2 + 1] ^= 0x40  # high byte of the first step exponent: |e| >= 16384
    crafted = pack_stream(codec.codec_id, LAYOUT, 23, 10, [compress(bytes(side)), *info.sections[1:]])
    with pytest.raises(CodecError, match="step exponents out of range"):
        codec.decode(crafted, LAYOUT)


def test_crafted_stream_with_an_anchor_coded_against_an_anchor_is_rejected():
    """Anchors are coded against zero or the mean; one that names an anchor as its
    reference has nothing to refer to: CodecError on every decode path."""
    from kvstore.codec.sections import compress, decompress
    from kvstore.codec.stream import pack_stream, unpack_stream

    codec = get_codec("L1")
    info = unpack_stream(STREAMS["L1"], LAYOUT, codec.codec_id)
    side = bytearray(decompress(info.sections[0], _side_size(23), "side"))
    planes, channels = LAYOUT.num_layers * 2, LAYOUT.num_kv_heads * LAYOUT.head_dim
    side[planes * channels * 2 + planes * 23 * 2 + 10] = 2  # plane 0, token 10 (an anchor): REF_ANCHOR
    crafted = pack_stream(codec.codec_id, LAYOUT, 23, 10, [compress(bytes(side)), *info.sections[1:]])
    with pytest.raises(CodecError, match="anchor row that refers to an anchor"):
        codec.decode(crafted, LAYOUT)


def test_huge_declared_token_count_is_rejected_before_allocating():
    from kvstore.codec.stream import pack_stream, unpack_stream

    codec = get_codec("L1")
    info = unpack_stream(STREAMS["L1"], LAYOUT, codec.codec_id)
    crafted = pack_stream(codec.codec_id, LAYOUT, (1 << 24) - 1, 10, list(info.sections))
    with pytest.raises(CodecError, match="decode limit"):
        codec.decode(crafted, LAYOUT)
    crafted = pack_stream(codec.codec_id, LAYOUT, 1000, 10, list(info.sections))
    with pytest.raises(CodecError, match="frame declares"):
        codec.decode(crafted, LAYOUT)


def test_crafted_escape_count_mismatch_is_rejected():
    from kvstore.codec.sections import compress
    from kvstore.codec.stream import pack_stream, unpack_stream

    kv = structured_kv(num_tokens=23)
    codec = get_codec(level_names()[-1])  # the coarsest level packs narrower than 8 bits
    info = unpack_stream(codec.encode(kv, LAYOUT), LAYOUT, codec.codec_id)
    width = info.sections[2][0]
    assert width in (2, 4)
    extra = bytes([width]) + compress(b"\x7f" * 3)  # three escape values nobody asked for
    crafted = pack_stream(codec.codec_id, LAYOUT, 23, 10, [*info.sections[:2], extra])
    with pytest.raises(CodecError, match="escapes"):
        codec.decode(crafted, LAYOUT)
    bad_width = pack_stream(codec.codec_id, LAYOUT, 23, 10, [*info.sections[:2], b"\x03"])
    with pytest.raises(CodecError, match="width"):
        codec.decode(bad_width, LAYOUT)


def _decode_or_codec_error(name: str, stream: bytes) -> None:
    try:
        out = get_codec(name).decode(stream, LAYOUT)
    except CodecError:
        return
    expected = get_codec(name).decode(STREAMS[name], LAYOUT)
    assert out.shape == expected.shape
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), "wrong tensor decoded"


def _side_size(num_tokens: int) -> int:
    planes, channels = LAYOUT.num_layers * 2, LAYOUT.num_kv_heads * LAYOUT.head_dim
    return planes * channels * 2 + planes * num_tokens * 4
