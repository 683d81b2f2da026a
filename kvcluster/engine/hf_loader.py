"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into the engine."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from kvcluster.engine.arch import ModelArch
from kvcluster.engine.dtypes import torch_dtype
from kvcluster.engine.model import LlamaModel


def load_hf_checkpoint(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    max_positions: int | None = None,
) -> tuple[ModelArch, LlamaModel]:
    """Build the model from ``path/config.json`` and every ``path/*.safetensors`` shard.

    Args:
        max_positions: cap on the RoPE tables' length (the context the engine
            serves); the config's ``max_position_embeddings`` when smaller or None.
    Raises:
        ValueError: unknown architecture, a missing or mis-shaped tensor.
        FileNotFoundError: no config.json or no safetensors file.
    """
    folder = Path(path)
    arch = load_arch(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    positions = min(max_positions or arch.max_position_embeddings, arch.max_position_embeddings)
    model = LlamaModel(arch, positions, torch_dtype(dtype), device)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(s), framework="pt")) for s in shards]
        where = {name: f for f in files for name in f.keys()}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name, f in where.items()}
        model.load_hf_weights(lambda name: where[name].get_tensor(name), shapes)
    return arch, model.eval()


def load_arch(folder: str | Path) -> ModelArch:
    """Parse ``folder/config.json``."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return ModelArch.from_hf_config(json.loads(config_path.read_text()))
