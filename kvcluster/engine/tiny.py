"""A deterministic, random-initialised tiny model in Hugging Face format, for fast tests.

``write_tiny_model(dir, arch)`` writes ``config.json``, ``model.safetensors`` and
a byte-level ``tokenizer.json`` (256 byte tokens + 3 ChatML-style specials).
The same seed always gives the same bytes; no transformers code is involved.

Variants:
    llama   LlamaForCausalLM, tied embeddings
    llama3  LlamaForCausalLM, untied embeddings, Llama 3 rope scaling
    qwen2   Qwen2ForCausalLM (q/k/v biases), tied embeddings
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvcluster.engine.arch import ModelArch
from kvcluster.engine.weights import hf_tensor_shapes

TINY_ARCHS = ("llama", "llama3", "qwen2")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_tiny_model(directory: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write the tiny model into ``directory`` (created if needed); returns it."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r} (choose from {', '.join(TINY_ARCHS)})")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(_random_tensors(ModelArch.from_hf_config(config), seed), folder / "model.safetensors")
    _write_tokenizer(folder / "tokenizer.json")
    return folder


def tiny_config(arch: str) -> dict:
    """The config.json dict of a tiny variant (vocab 320, 2 layers, 4 q / 2 kv heads)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 257,
        "eos_token_id": 258,
        "torch_dtype": "float32",
    }
    if arch == "llama3":
        config["tie_word_embeddings"] = False
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    if arch == "qwen2":
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                      use_sliding_window=False)
        for key in ("attention_bias", "mlp_bias", "head_dim"):
            del config[key]
    return config


def _random_tensors(arch: ModelArch, seed: int) -> dict[str, torch.Tensor]:
    """Scaled so activations and logits stay O(1): the parity test then means something."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(arch).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            tensors[name] = 0.1 * noise
        elif name == "model.embed_tokens.weight":
            tensors[name] = 0.5 * noise
        else:
            tensors[name] = noise / shape[-1] ** 0.5
    return tensors


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(path))
