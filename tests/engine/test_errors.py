"""Bad input raises an error that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvcluster.engine.arch import ModelArch
from kvcluster.engine.hf_loader import load_hf_checkpoint
from kvcluster.engine.sequence import Sequence
from kvcluster.engine.tiny import tiny_config
from tests.engine.conftest import make_runner


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_is_named():
    config = dict(tiny_config("llama"), architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="unknown architecture.*MistralForCausalLM"):
        ModelArch.from_hf_config(config)


def test_unsupported_rope_scaling_is_named():
    config = dict(tiny_config("llama"), rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelArch.from_hf_config(config)


def test_missing_tensor_is_named(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs["qwen2"], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias' "
                                         r"\(expected shape \(32,\)\)"):
        load_hf_checkpoint(folder)


def test_misshaped_tensor_is_named(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs["llama"], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 159)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape "
                                         r"\(64, 159\), expected \(64, 160\)"):
        load_hf_checkpoint(folder)


def test_sharded_checkpoint_loads(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs["llama"], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:7]}, folder / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[7:]}, folder / "model-00002-of-00002.safetensors")
    _, model = load_hf_checkpoint(folder)
    assert torch.equal(model.embed, tensors["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head, tensors["model.embed_tokens.weight"].T)  # tied


def test_prompt_longer_than_context_or_pool(tiny_dirs):
    runner = make_runner(tiny_dirs["llama"], max_model_len=32, num_blocks=16)
    with pytest.raises(ValueError, match="33 tokens exceed the context length max_model_len=32"):
        runner.prefill(Sequence("long", list(range(33))))
    small = make_runner(tiny_dirs["llama"], num_blocks=4)  # 16 tokens
    with pytest.raises(ValueError, match="20 tokens need 5 KV blocks, the pool has 4"):
        small.prefill(Sequence("big", list(range(20))))
    assert small.blocks.num_free == 4  # nothing leaked


def test_context_capped_by_max_position_embeddings(tiny_dirs, tmp_path):
    folder = _copy(tiny_dirs["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=24)))
    runner = make_runner(folder, max_model_len=4096)
    assert runner.max_model_len == 24 and runner.model.rope_cos.shape == (24, 16)
    with pytest.raises(ValueError, match="max_model_len=24"):
        runner.prefill(Sequence("x", list(range(25))))


def test_decode_step_needs_one_new_token(tiny_dirs):
    runner = make_runner(tiny_dirs["llama"])
    seq = Sequence("a", [1, 2, 3])
    runner.prefill(seq)
    with pytest.raises(ValueError, match="exactly one new token, has 0"):
        runner.decode_step([seq])


def test_cached_tokens_must_be_covered_by_attached_blocks(tiny_dirs):
    runner = make_runner(tiny_dirs["llama"])
    seq = Sequence("a", list(range(12)))
    seq.attach_cached(runner.blocks.allocate(1), num_tokens=8)  # 1 block = 4 tokens
    with pytest.raises(ValueError, match="8 cached tokens but only 1 blocks of 4 attached"):
        runner.prefill(seq)
