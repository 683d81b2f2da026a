"""The Hugging Face tensor names and shapes a Llama-family checkpoint must hold."""

from __future__ import annotations

from typing import Mapping, Sequence

from kvcluster.engine.arch import ModelArch


def hf_tensor_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, by Hugging Face name -> expected shape."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    for i in range(arch.num_layers):
        shapes.update(_layer_shapes(arch, f"model.layers.{i}.", hidden, inter))
    return shapes


def check_hf_tensors(arch: ModelArch, actual: Mapping[str, Sequence[int]]) -> None:
    """Raise ValueError naming the first missing or mis-shaped tensor."""
    for name, expected in hf_tensor_shapes(arch).items():
        if name not in actual:
            raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {expected})")
        if tuple(actual[name]) != expected:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(actual[name])}, expected {expected}"
            )


def _layer_shapes(arch: ModelArch, prefix: str, hidden: int, inter: int) -> dict:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    shapes = {
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
        attn + "q_proj.weight": (arch.q_size, hidden),
        attn + "k_proj.weight": (arch.kv_size, hidden),
        attn + "v_proj.weight": (arch.kv_size, hidden),
        attn + "o_proj.weight": (hidden, arch.q_size),
        mlp + "gate_proj.weight": (inter, hidden),
        mlp + "up_proj.weight": (inter, hidden),
        mlp + "down_proj.weight": (hidden, inter),
    }
    if arch.qkv_bias:
        shapes[attn + "q_proj.bias"] = (arch.q_size,)
        shapes[attn + "k_proj.bias"] = (arch.kv_size,)
        shapes[attn + "v_proj.bias"] = (arch.kv_size,)
    return shapes
