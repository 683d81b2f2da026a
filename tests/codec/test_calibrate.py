"""The profile calibration's own model forward agrees with the engine (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from bench.codec_calibrate import context_kv, fisher_diagonal, forward, plane_weights
from kvcluster.common.layout import KVLayout
from kvcluster.engine.sequence import Sequence
from kvstore.codec.profile import ModelProfile
from tests.codec.conftest import tiny_runner

CONTEXT = list(range(3, 43))
CONTINUATION = [50, 51, 52, 53, 54, 55]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return tiny_runner(tmp_path_factory.mktemp("calib_tiny") / "llama", num_blocks=32, max_model_len=128)


def test_forward_matches_the_engine(runner):
    seq = Sequence("ctx", CONTEXT)
    engine_logits = runner.prefill(seq, all_logits=True)
    engine_kv = runner.cache.export_blocks(seq.block_table)[:, :, :len(CONTEXT)]
    runner.free(seq)
    kv, query_sum = context_kv(runner.model, CONTEXT)
    assert torch.allclose(forward(runner.model, CONTEXT, None, 0), engine_logits, atol=1e-4)
    assert torch.allclose(kv, engine_kv.half().float())
    arch = runner.model.arch
    assert query_sum.shape == (arch.num_layers, arch.num_heads, arch.head_dim)


def test_forward_after_a_past_continues_the_sequence(runner):
    kv, _ = context_kv(runner.model, CONTEXT)
    whole = forward(runner.model, CONTEXT + CONTINUATION, None, 0)[len(CONTEXT):]
    after = forward(runner.model, CONTINUATION, kv, len(CONTEXT))
    assert torch.allclose(after, whole, atol=2e-2)  # the past went through fp16


def test_fisher_and_plane_weights(runner):
    torch.manual_seed(0)
    arch = runner.model.arch
    kv, query_sum = context_kv(runner.model, CONTEXT)
    fisher = fisher_diagonal(runner.model, kv, CONTINUATION, samples=2)
    assert fisher.shape == kv.shape and bool((fisher >= 0).all()) and float(fisher.sum()) > 0
    layout = KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, 8, "float16")
    unit = ModelProfile("unit", torch.ones(2 * arch.num_layers), query_sum / len(CONTEXT))
    weights = plane_weights(kv, fisher, layout, unit)
    assert weights.shape == (2 * arch.num_layers,) and abs(float(weights.mean()) - 1) < 1e-5


def test_plane_bases_are_principal_axes_of_pre_rope_rows_and_round_trip_a_profile(runner, tmp_path):
    from bench.codec_calibrate import plane_bases
    from kvcluster.engine.rope import inv_frequencies
    from kvstore.codec.profile import load_profile, save_profile

    arch = runner.model.arch
    kv, query_sum = context_kv(runner.model, CONTEXT)
    inv_freq = inv_frequencies(arch)
    bases = plane_bases([kv], inv_freq, arch.num_kv_heads)
    planes, channels = 2 * arch.num_layers, arch.num_kv_heads * arch.head_dim
    assert bases.shape == (planes, channels, channels)
    eye = torch.eye(channels).expand(planes, -1, -1)
    assert torch.allclose(bases.transpose(1, 2) @ bases, eye, atol=1e-4)
    path = tmp_path / "tiny.npz"
    save_profile(path, torch.ones(planes), query_sum / len(CONTEXT), bases, inv_freq)
    shape = (arch.num_layers, arch.num_kv_heads, arch.head_dim)
    transform = load_profile(path, shape).transform
    assert transform is not None and torch.allclose(transform.bases, bases, atol=2e-3)
    rows = transform.forward(kv.reshape(planes, len(CONTEXT), channels), 0).float()
    variance = (rows - rows.mean(1, keepdim=True)).pow(2).mean(1)  # [P, C], largest axis first
    assert bool((variance[:, :-1] >= variance[:, 1:] - 1e-3 * variance[:, :1]).all())
