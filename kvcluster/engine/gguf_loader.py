"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model folder.

The folder holds what `hf_loader` (and `transformers`) read:

    config.json              LlamaForCausalLM hyper-parameters from the GGUF metadata
    model.safetensors        dequantized fp32 weights under Hugging Face tensor names
    tokenizer.json           byte-level BPE rebuilt from `tokenizer.ggml.*` metadata
    tokenizer_config.json    special tokens + the chat template
    generation_config.json   bos / eos / pad ids

Two llama.cpp conventions are undone here:
  * q/k projection rows: `convert_hf_to_gguf.py` permutes them per head with
    `w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2)` so that its RoPE can rotate
    adjacent pairs; `_unpermute` applies the exact inverse.
  * tensor shapes: GGUF lists dims fastest-first (`[cols, rows]`); dequantized arrays
    come back row-major as `[rows, cols]`, which is the torch `nn.Linear` layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcluster.engine.arch import ModelArch
from kvcluster.engine.weights import hf_tensor_shapes

SUPPORTED_ARCHS = ("llama",)
CONVERTER_VERSION = 1
"""Bump when the output folder's content changes, so cached conversions are redone."""

# GGUF per-layer tensor suffix -> Hugging Face name inside `model.layers.{i}.`
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class GGUFModelMeta:
    """The hyper-parameters a Llama checkpoint needs, read from GGUF metadata."""

    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert `gguf_path` into a Hugging Face folder at `out_dir` and return it.

    Raises:
        ValueError: unreadable/truncated file, unsupported architecture or tokenizer,
            or a missing / mis-shaped tensor (the message names it).
    """
    reader = _open_reader(Path(gguf_path))
    meta = read_meta(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, tied="output.weight" not in tensors)
    shapes = hf_tensor_shapes(ModelArch.from_hf_config(config))
    state = _convert_tensors(tensors, meta, shapes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(state, out / "model.safetensors")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(meta))
    _write_tokenizer(reader, meta, out)
    return out


def read_meta(reader) -> GGUFModelMeta:
    """Hyper-parameters from an open `gguf.GGUFReader`; ValueError if unsupported."""
    arch = read_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_ARCHS}")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ValueError("GGUF rope_freqs.weight (Llama 3 rope scaling) is not supported yet")
    hidden = read_field(reader, f"{arch}.embedding_length")
    heads = read_field(reader, f"{arch}.attention.head_count")
    return GGUFModelMeta(
        arch=arch,
        num_layers=int(read_field(reader, f"{arch}.block_count")),
        hidden_size=int(hidden),
        intermediate_size=int(read_field(reader, f"{arch}.feed_forward_length")),
        num_heads=int(heads),
        num_kv_heads=int(read_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(read_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rope_theta=_clean_float(read_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=_clean_float(read_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        context_length=int(read_field(reader, f"{arch}.context_length")),
        vocab_size=_vocab_size(reader, arch),
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=read_field(reader, "tokenizer.ggml.padding_token_id", None),
        unk_token_id=read_field(reader, "tokenizer.ggml.unknown_token_id", None),
    )


_MISSING = object()


def read_field(reader, key: str, default=_MISSING):
    """A metadata value; ValueError naming the key if it is missing and no default."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


# ---------------------------------------------------------------------------
# private helpers: reading
# ---------------------------------------------------------------------------


def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises many types on truncated data
        raise ValueError(f"{path}: unreadable GGUF file (truncated or corrupt?): {exc}") from exc


def _clean_float(value: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05 (the value the model was trained with)."""
    return float(f"{float(value):.7g}")


def _vocab_size(reader, arch: str) -> int:
    key = f"{arch}.vocab_size"
    if key in reader.fields:
        return int(read_field(reader, key))
    return len(reader.fields["tokenizer.ggml.tokens"].data)


# ---------------------------------------------------------------------------
# private helpers: tensors
# ---------------------------------------------------------------------------


def _convert_tensors(tensors: dict, meta: GGUFModelMeta, shapes: dict) -> dict[str, np.ndarray]:
    """Dequantize every tensor `shapes` names (HF name -> torch shape) to fp32."""
    names = _hf_names(meta)
    if "output.weight" in tensors:
        names["output.weight"] = "lm_head.weight"
    state = {}
    for gguf_name, hf_name in names.items():
        if gguf_name not in tensors:
            raise ValueError(f"GGUF tensor {gguf_name!r} (for {hf_name}) is missing")
        weight = _dequantize(tensors[gguf_name], shapes[hf_name])
        state[hf_name] = _maybe_unpermute(hf_name, weight, meta)
    return state


def _hf_names(meta: GGUFModelMeta) -> dict[str, str]:
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for i in range(meta.num_layers):
        names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in _LAYER_TENSORS.items()})
    return names


def _dequantize(tensor, expected: tuple[int, ...]) -> np.ndarray:
    from gguf.quants import dequantize

    ggml_shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are fastest-first
    if ggml_shape != expected:
        raise ValueError(f"GGUF tensor {tensor.name!r} has shape {ggml_shape}, expected {expected}")
    array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    return np.ascontiguousarray(array.reshape(expected))


def _maybe_unpermute(hf_name: str, weight: np.ndarray, meta: GGUFModelMeta) -> np.ndarray:
    if hf_name.endswith("q_proj.weight"):
        return _unpermute(weight, meta.num_heads)
    if hf_name.endswith("k_proj.weight"):
        return _unpermute(weight, meta.num_kv_heads)
    return weight


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: [n_head * hd, cols], pairs (2, hd/2) <- (hd/2, 2)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, cols)  # llama.cpp interleaved pairs
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(rows, cols))  # HF half-split


def _write_weights(state: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------
# private helpers: json files
# ---------------------------------------------------------------------------


def _hf_config(meta: GGUFModelMeta, tied: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta.hidden_size,
        "intermediate_size": meta.intermediate_size,
        "num_hidden_layers": meta.num_layers,
        "num_attention_heads": meta.num_heads,
        "num_key_value_heads": meta.num_kv_heads,
        "head_dim": meta.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.context_length,
        "rms_norm_eps": meta.rms_norm_eps,
        "rope_theta": meta.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": meta.vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.bos_token_id,
        "eos_token_id": meta.eos_token_id,
        "pad_token_id": meta.pad_token_id,
        "torch_dtype": "float32",
    }


def _generation_config(meta: GGUFModelMeta) -> dict:
    ids = {"bos_token_id": meta.bos_token_id, "eos_token_id": meta.eos_token_id}
    return ids | {"pad_token_id": meta.pad_token_id}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(reader, meta: GGUFModelMeta, out: Path) -> None:
    from kvcluster.engine.gguf_vocab import build_tokenizer, tokenizer_config

    tokenizer = build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(reader, meta))
