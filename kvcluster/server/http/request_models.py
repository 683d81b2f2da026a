"""Request bodies of the OpenAI-compatible API (pydantic), as OpenAI and vLLM name them.

Types are strict (``"max_tokens": "5"`` is a 400, not 5) and numbers finite.
Fields we do not know are ignored, as vLLM does; fields we know but do not
support, where they would change the answer (``n: 2``, penalties, logprobs,
tools, ...), are answered by :meth:`CommonRequest.unsupported` with their name.

Extensions (send them with the SDK's ``extra_body``): ``top_k``, ``cache_salt``
(vLLM's names), ``stop_token_ids``, ``ignore_eos``, ``slo_ms`` (time-to-first-token objective)
and ``timeout_s`` (a deadline: past it the request fails with 504).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegativeInt = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, lt=2**64)]
StopString = Annotated[str, Field(min_length=1)]
MAX_CACHE_SALT_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]``: no choices, the request's usage."""
    continuous_usage_stats: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """"developer" is OpenAI's newer name for "system" and is rendered as one."""
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class CommonRequest(_Strict):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    """0 or -1: off (vLLM uses -1)."""
    seed: Seed | None = None
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    """Salts this request's cache namespace within its tenant (vLLM's name): only
    requests with the same tenant and salt share cached KV."""
    slo_ms: float = Field(default=0.0, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first parameter we cannot honour, else None."""
        if self.n != 1:
            return "n", f"n={self.n} is not supported: only one choice per request (n=1)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.cache_salt is not None and not self.cache_salt.isprintable():
            return "cache_salt", "cache_salt must be printable characters"
        return _unsupported_extension(self.model_extra or {})

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs is not None:
            return "logprobs", "logprobs are not supported"
        for name in ("tools", "functions", "function_call"):
            if getattr(self, name):
                return name, f"{name} (tool calling) is not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported (tool calling)"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "response_format other than text is not supported"
        for i, message in enumerate(self.messages):
            if message.tool_calls:
                return f"messages.{i}.tool_calls", "tool calls are not supported"
        return super().unsupported()

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    max_tokens: int | None = Field(default=16, ge=1)
    """OpenAI's default for text completions."""
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        batched = isinstance(self.prompt, list) and self.prompt and not isinstance(
            self.prompt[0], int)
        if batched and len(self.prompt) != 1:
            return "prompt", (f"{len(self.prompt)} prompts in one request are not "
                              "supported: send one prompt per request")
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of", f"best_of={self.best_of} is not supported (only 1)"
        return super().unsupported()

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


# vLLM's sampling extensions, by the value that leaves the answer unchanged.
_NEUTRAL_EXTENSIONS: dict[str, Any] = {
    "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0,
    "use_beam_search": False, "length_penalty": 1.0, "prompt_logprobs": None,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "structured_outputs": None, "prediction": None, "audio": None,
    "bad_words": None, "allowed_token_ids": None, "logits_processors": None,
}


def _unsupported_extension(extra: dict[str, Any]) -> tuple[str, str] | None:
    for name, neutral in _NEUTRAL_EXTENSIONS.items():
        if name in extra and extra[name] != neutral and extra[name] not in ([], {}):
            return name, f"{name} is not supported"
    modalities = extra.get("modalities")
    if modalities not in (None, ["text"]):
        return "modalities", "only the text modality is supported"
    return None
