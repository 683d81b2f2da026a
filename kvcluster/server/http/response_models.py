"""Response bodies of the OpenAI-compatible API (pydantic), in OpenAI's shapes.

Two extensions, which OpenAI clients keep as extra fields:

    usage.prompt_tokens_details.cached_tokens_by_tier   {"device": n, "host": n, ...}
    kvcluster: {ttft_ms, prefill_instance, decode_instance, stage_ms: {stage: ms}}

``cached_tokens`` is always present (0 when nothing came from a cache), as
SGLang and vLLM report it.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from kvcluster.common.requests import FinalEvent

FinishReason = Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, final: FinalEvent, num_prompt_tokens: int) -> "Usage":
        """The usage of a finished request (``num_prompt_tokens``: the front end's count,
        used when the backend reports none)."""
        prompt = final.num_prompt_tokens or num_prompt_tokens
        return cls(prompt_tokens=prompt, completion_tokens=final.num_output_tokens,
                   total_tokens=prompt + final.num_output_tokens,
                   prompt_tokens_details=PromptTokensDetails(
                       cached_tokens=final.num_cached_tokens,
                       cached_tokens_by_tier=dict(final.cached_tokens_by_tier)))


class ServingInfo(BaseModel):
    """The ``kvcluster`` extension: where and how fast the request was served."""

    ttft_ms: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    stage_ms: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, final: FinalEvent) -> "ServingInfo":
        return cls(ttft_ms=final.ttft_ms, prefill_instance=final.prefill_instance,
                   decode_instance=final.decode_instance, stage_ms=dict(final.stage_ms))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kvcluster: ServingInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    kvcluster: ServingInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion, whole or (``stream``) one chunk of it: OpenAI uses one shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kvcluster: ServingInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvcluster"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
