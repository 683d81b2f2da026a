"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` loaded from a Hugging Face folder.

Adds what serving needs on top of encode/decode: the ChatML chat template (rendered
directly, without jinja), the stop token ids, and a streaming detokenizer whose text
deltas never split a multi-byte UTF-8 character.

SmolLM2's template (GGUF `tokenizer.chat_template`) is ChatML that injects a default
system turn when the first message is not a system message:

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM,
                       trained by Hugging Face<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                    (the generation prompt)

The default system text is read from the folder's template, so other ChatML models work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_STOP_TOKENS = (IM_END, END_OF_TEXT)
# The template's newline may be a real one or a jinja escape (backslash + n).
_DEFAULT_SYSTEM_RE = re.compile(
    re.escape(IM_START) + r"system(?:\n|\\n)(.*?)" + re.escape(IM_END), re.S
)


class Tokenizer:
    """Encode/decode text, render chat prompts, and detokenize streams."""

    def __init__(self, backend, config: dict | None = None) -> None:
        self._backend = backend  # tokenizers.Tokenizer
        self._config = config or {}
        self.default_system_prompt = _default_system_prompt(self._config.get("chat_template"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json` if present) from a model folder."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json in the model folder")
        config_file = path / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        return cls(Backend.from_file(str(path / "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a chat answer: `<|im_end|>`, `<|endoftext|>` and the configured eos."""
        names = list(_STOP_TOKENS) + [_token_name(self._config.get("eos_token"))]
        ids = {self._backend.token_to_id(n) for n in names if n}
        return tuple(sorted(i for i in ids if i is not None))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are matched as single tokens."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `[{"role": ..., "content": ...}, ...]` as a ChatML prompt string."""
        turns = list(messages)
        if turns and turns[0]["role"] != "system" and self.default_system_prompt is not None:
            turns.insert(0, {"role": "system", "content": self.default_system_prompt})
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns generated token ids into text deltas, one `push` per token.

    Holds back text while the decoded tail ends in U+FFFD (an incomplete UTF-8
    sequence); only a small window of recent tokens is re-decoded per step:

        ids:  ... | prefix_offset ........ read_offset ........ end
                    already-emitted context  |  not yet emitted
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (may be "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)


def _default_system_prompt(template: str | None) -> str | None:
    """The system text a ChatML template injects when none is given (None if it injects none)."""
    if not template:
        return None
    match = _DEFAULT_SYSTEM_RE.search(template)
    return match.group(1) if match else None


def _token_name(token) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token
