"""Attention importance from the prefill's own queries (the KV codec's encode hint)."""

from __future__ import annotations

import pytest
import torch

from kvcluster.engine.attention_importance import (
    attention_importance,
    prefill_with_importance,
)
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import make_runner, prompt

NUM_TOKENS = 45


@pytest.fixture(scope="module")
def runner(tiny_dirs):
    return make_runner(tiny_dirs["llama"])


def test_shape_sums_and_same_logits(runner):
    ids = prompt(NUM_TOKENS, seed=1)
    plain = Sequence("plain", ids)
    expected = runner.prefill(plain)
    runner.free(plain)
    seq = Sequence("hinted", ids)
    logits, mass = prefill_with_importance(runner, seq, window=8, aggregation="mass")
    runner.free(seq)
    assert torch.equal(logits, expected)  # the tap does not change the forward
    num_layers, num_heads = runner.arch.num_layers, runner.arch.num_heads
    assert mass.shape == (num_layers, NUM_TOKENS) and mass.dtype == torch.float32
    # every query head's weights sum to 1: the mean over queries of their sum is H_q
    assert torch.allclose(mass.sum(1), torch.full((num_layers,), float(num_heads)), atol=1e-4)
    assert bool((mass >= 0).all())


def test_deterministic_and_a2_bounded_by_mass(runner):
    ids = prompt(NUM_TOKENS, seed=2)
    out = []
    for aggregation in ("a2", "a2", "mass"):
        seq = Sequence("s", ids)
        out.append(prefill_with_importance(runner, seq, window=16, aggregation=aggregation)[1])
        runner.free(seq)
    assert torch.equal(out[0], out[1])
    assert bool((out[0] <= out[2] + 1e-6).all()) and bool((out[0] > 0).any())  # a^2 <= a


def test_matches_a_direct_softmax():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 5, 4, 8, generator=gen)  # [L, W, H_q, D]
    keys = torch.randn(2, 12, 2, 8, generator=gen)  # [L, T, H_kv, D]
    got = attention_importance(queries, keys, "a2")
    expected = torch.zeros(2, 12)
    for layer in range(2):
        for i in range(5):
            position = 12 - 5 + i
            for head in range(4):
                k = keys[layer, : position + 1, head // 2]
                a = (k @ queries[layer, i, head] / 8 ** 0.5).softmax(0)
                expected[layer, : position + 1] += a.square() / 5
    assert torch.allclose(got, expected, atol=1e-6)


def test_cached_prefix_and_bad_arguments(runner):
    ids = prompt(NUM_TOKENS, seed=3)
    seq = Sequence("a", ids[:32])
    runner.prefill(seq)
    seq.append_token(ids[32])  # a one-token suffix: one query, keys from the cache
    _, importance = prefill_with_importance(runner, seq, window=64)
    runner.free(seq)
    assert importance.shape == (runner.arch.num_layers, 33)
    with pytest.raises(ValueError, match="window"):
        attention_importance(torch.zeros(1, 0, 4, 8), torch.zeros(1, 3, 2, 8))
    with pytest.raises(ValueError, match="aggregation"):
        attention_importance(torch.zeros(1, 1, 4, 8), torch.zeros(1, 3, 2, 8), "max")
    with pytest.raises(ValueError, match="do not fit"):
        attention_importance(torch.zeros(1, 4, 4, 8), torch.zeros(1, 3, 2, 8))
