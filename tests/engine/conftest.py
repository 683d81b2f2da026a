"""Tiny random models on disk, shared by the engine tests (written once per session)."""

from __future__ import annotations

import pytest
import torch

from kvcluster.common.config import EngineConfig
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "llama3", "qwen2")}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """transformers' reference implementation of each tiny variant (fp32, eval)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    models = {}
    for arch, path in tiny_dirs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        models[arch] = model.eval()
    return models


def make_runner(path, block_size=4, num_blocks=64, max_model_len=512, packed=True,
                **kwargs) -> ModelRunner:
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks,
                          max_model_len=max_model_len, cpu_packed_weights=packed)
    return ModelRunner.from_pretrained(path, engine_config=config, **kwargs)


def hf_logits(model, token_ids) -> torch.Tensor:
    """transformers' logits for every position ``[len(token_ids), vocab]``."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def prompt(length: int, seed: int, vocab: int = 320) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()
