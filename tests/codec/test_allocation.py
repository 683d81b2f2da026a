"""Bit allocation: model profiles, per-row scales, order classes."""

from __future__ import annotations

import math

import pytest
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec import get_codec
from kvstore.codec.allocation import (
    ATTENTION_CLAMP,
    RECENT_SCALE,
    RECENT_TOKENS,
    SINK_CLASS,
    attention_scales,
    order_classes,
    row_scales,
)
from kvstore.codec.profile import GENERIC_EARLY_SCALE, ModelProfile, profile_for
from tests.codec.conftest import LAYOUT, structured_kv

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")


def test_unknown_model_shape_gets_the_generic_profile():
    profile = profile_for(LAYOUT)
    assert profile.name == "generic" and profile.mean_query is None
    expected = torch.tensor([GENERIC_EARLY_SCALE] * 2 + [1.0] * 6)  # 4 layers: the first is early
    assert torch.equal(profile.plane_scales, expected)


def test_smollm2_profile_is_shipped_and_fits():
    profile = profile_for(SMOLLM2)
    assert profile.name == "smollm2-135m"
    assert profile.plane_scales.shape == (60,) and bool((profile.plane_scales > 0).all())
    assert profile.mean_query.shape == (30, 9, 64)
    assert profile_for(SMOLLM2.with_dtype("bfloat16")) is profile  # cached, dtype-independent


def test_bad_profile_is_refused():
    with pytest.raises(ValueError, match="finite and positive"):
        ModelProfile("bad", torch.tensor([1.0, 0.0]), None)


def test_row_scales_first_token_recent_tokens_and_planes():
    num_tokens = RECENT_TOKENS + 36
    x = torch.randn(LAYOUT.num_layers * 2, num_tokens, 32)
    profile = profile_for(LAYOUT)
    scales = row_scales(x, LAYOUT, profile)
    planes = profile.plane_scales.unsqueeze(1)
    assert bool((scales[:, 0] == 0).all())
    assert torch.equal(scales[:, 1:-RECENT_TOKENS], planes.expand(-1, 35))
    assert torch.equal(scales[:, -RECENT_TOKENS:], (planes * RECENT_SCALE).expand(-1, RECENT_TOKENS))


def test_attention_scales_give_attended_tokens_finer_steps():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 50, 3, 64, generator=gen)  # [L, T, H, D]
    query = torch.randn(2, 9, 64, generator=gen)
    keys[:, 7] = 3 * query.view(2, 3, 3, 64).mean(2)  # token 7 matches every head's query
    profile = ModelProfile("test", torch.ones(4), query)
    scales = attention_scales(keys.view(2, 50, 192), *profile.query_projection(3))
    assert scales.shape == (2, 50)
    assert bool((scales[:, 0] == 1).all())  # left to the first-token rule
    assert scales[:, 1:].argmin(-1).tolist() == [6, 6]  # token 7 is the finest
    rest = scales[:, 1:]
    assert bool(((rest >= 1 / ATTENTION_CLAMP) & (rest <= ATTENTION_CLAMP)).all())
    geo = rest.log().mean(-1).exp()  # normalised before the clamp: about 1
    assert bool(((geo > 0.8) & (geo < 1.25)).all())


def test_query_projection_keeps_the_strongest_dims():
    query = torch.zeros(1, 2, 64)  # one layer, two query heads on one KV head
    query[0, 0, :20] = torch.arange(20.0)  # dims 4..19 are the 16 strongest
    query[0, 1, 40] = 100.0
    channels, block = ModelProfile("t", torch.ones(2), query).query_projection(1)
    assert channels.tolist() == [[*range(5, 20), 40]]
    keys = torch.randn(1, 6, 64)
    full = keys @ query[0].T / 8  # [1, T, 2] exact scores
    picked = torch.bmm(keys[:, :, channels[0]], block)
    assert torch.allclose(picked[..., 1], full[..., 1], atol=1e-5)  # head 1 lives in dim 40


def test_order_classes_follow_the_scale():
    scales = torch.tensor([[0.0, 0.25, 0.5, 1.0, 2.0, 1e-30, 1e30]])
    classes = order_classes(scales)[0].tolist()
    assert classes[0] == SINK_CLASS
    assert classes[1:5] == [124, 126, 128, 130]  # two per octave, 128 at scale 1
    assert SINK_CLASS < classes[5] < classes[1] and classes[6] == 255  # clamped, never the sink


@pytest.mark.parametrize("name", ["L0", "L5"])
def test_profiled_layout_round_trips_within_bound(name):
    """The SmolLM2 profile (plane scales up to ~5, attention scales) keeps the documented
    per-element bound when it codes the channels as they are (``transform=False``)."""
    kv = structured_kv(SMOLLM2, num_tokens=90, seed=3)
    codec = get_codec(name, transform=False)
    out = codec.decode(codec.encode(kv, SMOLLM2), SMOLLM2)
    x = kv.float().reshape(60, 90, -1)
    mean = x.mean(1, keepdim=True).half().float()
    rms = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()
    alpha = max(codec.spec.max_alpha(SMOLLM2), math.sqrt(192) / 127)
    bound = alpha * rms * 2 ** 0.125 / 2 + 2 ** -14 + out.float().abs().reshape(x.shape) * 2 ** -11
    assert bool(((out.float().reshape(x.shape) - x).abs() <= bound + 1e-6 * x.abs()).all())
    first = (out.float() - kv.float())[:, :, 0].abs()  # the first token: int8 precision,
    norm = kv.float()[:, :, 0].flatten(-2).norm(dim=-1)[..., None, None]  # max|r| <= ||r|| <= ||x||
    cast = out.float()[:, :, 0].abs() * 2 ** -11
    assert bool((first <= norm / 254 * 1.01 + cast).all())
