"""The deterministic tiny model and its `kvcluster model init-tiny` command."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from kvcluster.cli import main as cli_main
from kvcluster.engine.arch import ModelArch
from kvcluster.engine.tiny import write_tiny_model


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_model(tmp_path / "a", "qwen2", seed=0)
    b = write_tiny_model(tmp_path / "b", "qwen2", seed=0)
    c = write_tiny_model(tmp_path / "c", "qwen2", seed=1)
    weights = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b) != weights(c)
    assert (a / "config.json").read_text() == (c / "config.json").read_text()


def test_cli_init_tiny_writes_a_loadable_model(tmp_path, capsys):
    assert cli_main(["model", "init-tiny", str(tmp_path / "m"), "--arch", "llama"]) == 0
    assert "wrote tiny llama model" in capsys.readouterr().out
    arch = ModelArch.from_hf_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    assert (arch.architecture, arch.num_layers, arch.num_kv_heads) == ("LlamaForCausalLM", 2, 2)
    tokenizer = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    text = "héllo\twörld 123 <|im_end|>"
    ids = tokenizer.encode(text).ids
    assert max(ids) == 258 < arch.vocab_size  # <|im_end|> is a special token
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
