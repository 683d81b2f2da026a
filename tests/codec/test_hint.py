"""Encode hints: checked, optional, within the error bound, and they move bits where they say."""

from __future__ import annotations

import math

import pytest
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec import EncodeHint, chunk_hints, get_codec
from kvstore.codec.allocation import RECENT_TOKENS, row_scales
from kvstore.codec.profile import profile_for
from tests.codec.conftest import LAYOUT, structured_kv

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")


def _importance(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layout.num_layers, num_tokens, generator=gen).pow(4)  # heavy-tailed


def test_no_hint_is_the_default_behaviour(kv, layout):
    codec = get_codec("L2")
    plain = codec.encode(kv, layout)
    assert codec.encode(kv, layout, None) == plain
    assert codec.encode(kv, layout, EncodeHint()) == plain  # flags only, both true: no change


@pytest.mark.parametrize("name", ["lossless", "int8", "L0", "L4"])
def test_hint_of_wrong_shape_is_refused(name, kv, layout):
    codec = get_codec(name)
    num_tokens = kv.shape[2]
    bad = [torch.ones(layout.num_layers, num_tokens + 1), torch.ones(layout.num_layers + 1, num_tokens),
           torch.ones(num_tokens)]
    for importance in bad:
        with pytest.raises(ValueError, match="importance must be"):
            codec.encode(kv, layout, EncodeHint(importance))
    for value in (float("nan"), -1.0):
        importance = torch.ones(layout.num_layers, num_tokens)
        importance[0, 3] = value
        with pytest.raises(ValueError, match="finite and >= 0"):
            codec.encode(kv, layout, EncodeHint(importance))


@pytest.mark.parametrize("name", ["lossless", "int8"])
def test_baselines_ignore_a_valid_hint(name, kv, layout):
    codec = get_codec(name)
    hint = EncodeHint(_importance(layout, kv.shape[2]), first_chunk=False, last_chunk=False)
    assert codec.encode(kv, layout, hint) == codec.encode(kv, layout)


@pytest.mark.parametrize("name", ["L0", "L3", "L6"])
@pytest.mark.parametrize("layout", [LAYOUT, SMOLLM2], ids=["generic", "smollm2"])
def test_hinted_round_trip_within_documented_bound(name, layout):
    """The per-element bound of plain coordinates (test_transform.py: the transform's row bound)."""
    num_tokens = 90
    kv = structured_kv(layout, num_tokens=num_tokens, seed=5)
    codec = get_codec(name, transform=False)
    for first, last in [(True, True), (False, False), (False, True)]:
        hint = EncodeHint(_importance(layout, num_tokens), first, last)
        out = codec.decode(codec.encode(kv, layout, hint), layout)  # no hint needed to decode
        x = kv.float().reshape(2 * layout.num_layers, num_tokens, -1)
        mean = x.mean(1, keepdim=True).half().float()
        rms = (x - mean).pow(2).mean(-1, keepdim=True).sqrt()
        alpha = max(codec.spec.max_alpha(layout, hinted=True), math.sqrt(x.shape[-1]) / 127)
        bound = alpha * rms * 2 ** 0.125 / 2 + 2 ** -14 + out.float().abs().reshape(x.shape) * 2 ** -11
        assert bool(((out.float().reshape(x.shape) - x).abs() <= bound + 1e-6 * x.abs()).all())


def test_first_and_last_chunk_flags_move_bits(layout):
    kv = structured_kv(layout, num_tokens=RECENT_TOKENS + 100, seed=2)
    codec = get_codec("L3")
    size = {(f, l): len(codec.encode(kv, layout, EncodeHint(None, f, l)))
            for f in (True, False) for l in (True, False)}
    assert size[(False, True)] < size[(True, True)]  # no int8 sink token
    assert size[(True, False)] < size[(True, True)]  # no fine tail window
    assert size[(False, False)] < min(size[(False, True)], size[(True, False)])


def test_flags_set_the_first_token_and_tail_scales(layout):
    num_tokens = RECENT_TOKENS + 20
    x = torch.randn(2 * layout.num_layers, num_tokens, 32)
    profile = profile_for(layout)
    middle = row_scales(x, layout, profile, EncodeHint(None, False, False))
    first = row_scales(x, layout, profile, EncodeHint(None, True, False))
    last = row_scales(x, layout, profile, EncodeHint(None, False, True))
    assert bool((first[:, 0] == 0).all()) and bool((middle[:, 0] > 0).all())
    assert torch.equal(first[:, 1:], middle[:, 1:])
    assert bool((last[:, -RECENT_TOKENS:] < middle[:, -RECENT_TOKENS:]).all())
    assert torch.equal(last[:, :-RECENT_TOKENS], middle[:, :-RECENT_TOKENS])


def test_importance_gives_attended_tokens_finer_steps():
    layout, num_tokens = SMOLLM2, 80
    kv = structured_kv(layout, num_tokens=num_tokens, seed=1)
    importance = torch.full((layout.num_layers, num_tokens), 0.01)
    importance[:, 30] = 40.0  # every layer attends to token 30
    hint = EncodeHint(importance, first_chunk=False, last_chunk=False)
    codec = get_codec("L3")
    err = (codec.decode(codec.encode(kv, layout, hint), layout).float() - kv.float()).pow(2)
    residual = (kv.float() - kv.float().mean(2, keepdim=True)).pow(2)
    rel = err.mean((0, 1, 3, 4)) / residual.mean((0, 1, 3, 4))  # [T] noise / residual energy
    assert float(rel[30]) < 0.1 * float(rel.median())


def test_chunk_hints_normalise_over_the_sequence():
    importance = torch.rand(3, 100) + 0.5
    importance[:, 0] = 1000.0  # the sink is left out of the mean
    hints = chunk_hints(importance, 32)
    assert [h.importance.shape for h in hints] == [(3, 32)] * 3 + [(3, 4)]
    assert [(h.first_chunk, h.last_chunk) for h in hints] == \
        [(True, False), (False, False), (False, False), (False, True)]
    whole = torch.cat([h.importance for h in hints], 1)
    assert torch.allclose(whole[:, 1:].mean(1), torch.ones(3))
    assert torch.allclose(whole, importance / importance[:, 1:].mean(1, keepdim=True))
    (single,) = chunk_hints(importance, 100)
    assert single.first_chunk and single.last_chunk
    with pytest.raises(ValueError):
        chunk_hints(importance, 0)
    with pytest.raises(ValueError):
        chunk_hints(importance[0], 10)
