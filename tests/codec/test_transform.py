"""The transform stage: pre-RoPE keys and a KLT per plane (kvstore/codec/transform.py)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcluster.common.layout import KVLayout
from kvcluster.engine.rope import apply_rope
from kvstore.codec import CodecError, EncodeHint, chunk_hints, get_codec
from kvstore.codec.profile import profile_for
from kvstore.codec.quantize import MAX_SYMBOL
from kvstore.codec.stream import unpack_stream
from kvstore.codec.transform import MATMUL_DTYPE, KVTransform
from tests.codec.conftest import LAYOUT, structured_kv, with_valid_crc

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")
LOW_PRECISION = 2.0 ** -6
"""Both basis matmuls run in bf16: generous relative allowance for their rounding."""


def _identity_transform(num_layers=2, heads=3, dim=8) -> KVTransform:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    eye = torch.eye(heads * dim).expand(2 * num_layers, -1, -1).contiguous()
    return KVTransform(eye, inv_freq, heads, fingerprint=0)


def _post_rope(pre: torch.Tensor, inv_freq: torch.Tensor, position: int) -> torch.Tensor:
    """Keys of ``pre [L, 2, T, H, D]`` rotated as the engine does at ``position``."""
    num_tokens = pre.shape[2]
    angles = torch.arange(position, position + num_tokens).float()[:, None] * inv_freq[None]
    emb = torch.cat((angles, angles), -1)
    out = pre.clone()
    for layer in range(pre.shape[0]):
        out[layer, 0] = apply_rope(pre[layer, 0], emb.cos()[:, None], emb.sin()[:, None])
    return out


@pytest.mark.parametrize("position", [0, 5000])
def test_forward_undoes_the_engines_rope_and_inverse_redoes_it(position):
    t = _identity_transform()
    pre = torch.randn(2, 2, 20, 3, 8)
    post = _post_rope(pre, t.inv_freq, position)
    planes = post.reshape(4, 20, 24)
    y = t.forward(planes, position).float()
    tol = LOW_PRECISION * pre.abs().max()
    assert torch.allclose(y, pre.reshape(4, 20, 24), atol=tol)  # keys pre-RoPE, values untouched
    back = t.inverse(y, position, torch.float32)
    assert torch.allclose(back, planes, atol=tol)
    assert not torch.allclose(t.forward(planes, position + 1).float(), y, atol=tol)  # the position matters


def test_shipped_profile_bases_are_orthonormal_and_fingerprinted():
    t = profile_for(SMOLLM2).transform
    assert t is not None and t.bases.shape == (60, 192, 192)
    gram = t.bases.transpose(1, 2) @ t.bases
    assert torch.allclose(gram, torch.eye(192).expand(60, -1, -1), atol=1e-5)
    assert t.fingerprint != 0 and profile_for(LAYOUT).transform is None  # generic: no transform
    with pytest.raises(ValueError, match="do not fit"):
        KVTransform(t.bases[:, :96, :96].contiguous(), t.inv_freq, 3, 1)


@pytest.mark.parametrize("name", ["L0", "L4"])
@pytest.mark.parametrize("hinted", [False, True])
def test_transformed_levels_keep_the_row_bound(name, hinted):
    """||x_t - xhat_t|| <= sqrt(C)/2 * step_t: the per-coordinate bound of the transformed
    rows, carried back by an orthonormal basis (docs/codec.md, error bound)."""
    kv = structured_kv(SMOLLM2, num_tokens=90, seed=3)
    codec = get_codec(name)
    importance = torch.rand(30, 90, generator=torch.Generator().manual_seed(0)) * 3 if hinted else None
    stream = codec.encode(kv, SMOLLM2, EncodeHint(importance, position=300))
    assert len(unpack_stream(stream, SMOLLM2, codec.codec_id).sections) == 4
    out = codec.decode(stream, SMOLLM2)
    x = kv.float().reshape(60, 90, 192)
    y = profile_for(SMOLLM2).transform.forward(x, 300).float()
    rms = (y - y.mean(1, keepdim=True)).pow(2).mean(-1).sqrt()  # [P, T]
    channels = 192
    alpha = max(codec.spec.max_alpha(SMOLLM2, hinted), math.sqrt(channels) / MAX_SYMBOL)
    bound = math.sqrt(channels) / 2 * alpha * 2 ** 0.125 * rms \
        + LOW_PRECISION * x.norm(dim=-1) + 2 ** -11 * out.float().reshape(x.shape).norm(dim=-1)
    err = (out.float().reshape(x.shape) - x).norm(dim=-1)
    assert bool((err <= bound).all())
    first = err[:, 0]  # the first token at int8 precision: ||err|| <= sqrt(C) * ||x|| / 254
    assert bool((first <= x[:, 0].norm(dim=-1) * (math.sqrt(channels) / 254 + LOW_PRECISION)).all())


def test_a_wrong_position_costs_size_not_correctness():
    kv = structured_kv(SMOLLM2, num_tokens=40, seed=1)
    codec = get_codec("L2")
    right = codec.decode(codec.encode(kv, SMOLLM2, EncodeHint(position=0)), SMOLLM2)
    wrong = codec.decode(codec.encode(kv, SMOLLM2, EncodeHint(position=777)), SMOLLM2)
    err_right = (right.float() - kv.float()).pow(2).mean()
    err_wrong = (wrong.float() - kv.float()).pow(2).mean()
    assert float(err_wrong) < 2 * float(err_right) + 1e-6


def test_transform_off_writes_the_plain_stream_and_both_decode():
    kv = structured_kv(SMOLLM2, num_tokens=40, seed=2)
    plain, coded = get_codec("L1", transform=False), get_codec("L1")
    plain_stream = plain.encode(kv, SMOLLM2)
    assert len(unpack_stream(plain_stream, SMOLLM2, plain.codec_id).sections) == 3
    assert torch.equal(coded.decode(plain_stream, SMOLLM2), plain.decode(plain_stream, SMOLLM2))
    assert plain.decode(coded.encode(kv, SMOLLM2), SMOLLM2).shape == kv.shape


def test_a_stream_naming_another_transform_is_refused():
    kv = structured_kv(SMOLLM2, num_tokens=30, seed=4)
    codec = get_codec("L0")
    stream = bytearray(codec.encode(kv, SMOLLM2, EncodeHint(position=16)))
    fingerprint, position = struct.unpack("<QI", stream[-12:])
    assert position == 16
    stream[-12:] = struct.pack("<QI", fingerprint ^ 1, position)
    with pytest.raises(CodecError, match="transform"):
        codec.decode(with_valid_crc(bytes(stream)), SMOLLM2)
    stream[-12:] = struct.pack("<QI", fingerprint, (1 << 32) - 10)
    with pytest.raises(CodecError, match="out of range"):
        codec.decode(with_valid_crc(bytes(stream)), SMOLLM2)


def test_hint_positions():
    hints = chunk_hints(torch.ones(30, 70), 32)
    assert [h.position for h in hints] == [0, 32, 64]
    kv = structured_kv(SMOLLM2, num_tokens=8)
    with pytest.raises(ValueError, match="position"):
        get_codec("L0").encode(kv, SMOLLM2, EncodeHint(position=-1))
    assert MATMUL_DTYPE in (torch.bfloat16, torch.float32)


TRANSFORMED = get_codec("L3").encode(structured_kv(SMOLLM2, num_tokens=12, seed=5), SMOLLM2,
                                     EncodeHint(position=40))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(back=st.integers(1, 12), value=st.integers(0, 255))
def test_mutated_transform_sections_never_crash(back, value):
    """A valid-crc stream with any byte of its transform section changed decodes or raises CodecError."""
    stream = bytearray(TRANSFORMED)
    stream[-back] = value
    try:
        out = get_codec("L3").decode(with_valid_crc(bytes(stream)), SMOLLM2)
    except CodecError:
        return
    assert out.shape == SMOLLM2.shape(12) and bool(torch.isfinite(out).all())
