"""Rebuild a Hugging Face `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata.

Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE) is supported. The pre-tokenizer
depends on `tokenizer.ggml.pre`: llama.cpp's `smollm` / `starcoder` pre-types split with
the regex `\\p{N}` first and then GPT-2's regex (llama-vocab.cpp), which in Hugging Face
terms is `Sequence([Digits(individual_digits=True), ByteLevel(use_regex=True)])`, the
pre-tokenizer of the upstream SmolLM2 tokenizer.json.
"""

from __future__ import annotations

from kvcluster.engine.gguf_loader import GGUFModelMeta, read_field

# tokenizer.ggml.pre values whose regexes are "\p{N}" + the GPT-2 regex in llama.cpp.
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone")
# tokenizer.ggml.pre values that use the plain GPT-2 regex.
_GPT2_PRES = ("gpt2", "gpt-2", "default", "mpt", "olmo", "jais")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's vocabulary. ValueError if unsupported."""
    from tokenizers import Tokenizer, decoders, models, processors

    model = read_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r}; only 'gpt2' (byte-level BPE)"
        )
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in read_field(reader, "tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(read_field(reader, "tokenizer.ggml.pre", "gpt2"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_special_tokens(tokenizer, tokens, _token_types(reader, len(tokens)))
    return tokenizer


def tokenizer_config(reader, meta: GGUFModelMeta) -> dict:
    """tokenizer_config.json: special tokens by content, the chat template, no auto-BOS."""
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    name = lambda token_id: None if token_id is None else tokens[token_id]  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(meta.bos_token_id),
        "eos_token": name(meta.eos_token_id),
        "pad_token": name(meta.pad_token_id),
        "unk_token": name(meta.unk_token_id),
        "add_bos_token": bool(read_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.context_length,
    }
    template = read_field(reader, "tokenizer.chat_template", None)
    return config | ({"chat_template": template} if template else {})


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRES:
        return byte_level
    raise ValueError(f"unsupported GGUF tokenizer.ggml.pre {pre!r} (no known pre-tokenizer)")


def _token_types(reader, num_tokens: int) -> list[int]:
    types = read_field(reader, "tokenizer.ggml.token_type", None)
    return list(types) if types is not None else [1] * num_tokens


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (never split, skipped when asked)."""
    from tokenizers import AddedToken

    special = [t for t, kind in zip(tokens, types) if kind == _TOKEN_CONTROL]
    user = [t for t, kind in zip(tokens, types) if kind == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

