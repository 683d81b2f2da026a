"""The one place where ``generate_pb2`` messages meet our own request and event types.

Both the front end (kvcluster/server/frontend*.py) and the client SDK (kvcluster/client)
convert here; ``tests/frontend/test_convert_generate.py`` checks round trips.
Functions named ``*_from_proto`` raise ``ValueError`` with a clear message for
values no request may carry (the front end answers INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from kvcluster.common.requests import ChatMessage, FinalEvent, StreamEvent, TokenEvent
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb

DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens


@dataclass(frozen=True)
class PromptInput:
    """What a request asks to continue: exactly one of text, chat messages or token ids."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.text, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")


# ---------------------------------------------------------------- requests


def request_to_proto(prompt: PromptInput, params: SamplingParams, *, stop: Sequence[str] = (),
                     tenant: str = "", slo_ms: float = 0.0,
                     request_id: str = "") -> pb.GenerateRequest:
    """Build the wire request a client sends."""
    msg = pb.GenerateRequest(sampling=sampling_to_proto(params, stop),
                             max_new_tokens=params.max_new_tokens, tenant=tenant,
                             slo_ms=slo_ms, request_id=request_id)
    if prompt.text is not None:
        msg.prompt = prompt.text
    elif prompt.messages is not None:
        msg.chat.SetInParent()
        msg.chat.messages.extend(pb.ChatMessage(role=m.role, content=m.content)
                                 for m in prompt.messages)
    else:
        msg.prompt_token_ids.SetInParent()
        msg.prompt_token_ids.ids.extend(prompt.token_ids)
    return msg


def prompt_from_proto(msg: pb.GenerateRequest) -> PromptInput:
    kind = msg.WhichOneof("input")
    if kind == "prompt":
        return PromptInput(text=msg.prompt)
    if kind == "chat":
        return PromptInput(messages=tuple(ChatMessage(m.role, m.content)
                                          for m in msg.chat.messages))
    if kind == "prompt_token_ids":
        return PromptInput(token_ids=tuple(msg.prompt_token_ids.ids))
    raise ValueError("request has no input: set prompt, chat or prompt_token_ids")


def sampling_to_proto(params: SamplingParams, stop: Sequence[str] = ()) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, stop=list(stop),
                            stop_token_ids=list(params.stop_token_ids),
                            ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: pb.GenerateRequest,
                        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
    """The request's SamplingParams (its max_new_tokens included); ValueError when invalid."""
    s = msg.sampling
    temperature = s.temperature if s.HasField("temperature") else 0.0
    top_p = s.top_p if s.HasField("top_p") else 1.0
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not math.isfinite(value):
            raise ValueError(f"sampling.{name} must be a finite number, got {value}")
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        temperature=float(temperature), top_p=float(top_p), top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


def stop_strings_from_proto(msg: pb.GenerateRequest) -> tuple[str, ...]:
    stops = tuple(msg.sampling.stop)
    if any(not s for s in stops):
        raise ValueError("sampling.stop strings must not be empty")
    return stops


# ---------------------------------------------------------------- responses


def event_to_proto(event: StreamEvent) -> pb.GenerateResponse:
    if isinstance(event, TokenEvent):
        return pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=list(event.token_ids),
                                                       text=event.text))
    return pb.GenerateResponse(final=pb.GenerateFinal(
        finish_reason=event.finish_reason, ttft_ms=event.ttft_ms,
        prefill_instance=event.prefill_instance, decode_instance=event.decode_instance,
        num_prompt_tokens=event.num_prompt_tokens, num_cached_tokens=event.num_cached_tokens,
        num_output_tokens=event.num_output_tokens, request_id=event.request_id,
        cached_tokens_by_tier=event.cached_tokens_by_tier, stage_ms=event.stage_ms))


def event_from_proto(msg: pb.GenerateResponse) -> StreamEvent:
    kind = msg.WhichOneof("kind")
    if kind == "chunk":
        return TokenEvent(tuple(msg.chunk.token_ids), msg.chunk.text)
    if kind == "final":
        f = msg.final
        return FinalEvent(f.finish_reason, f.ttft_ms, f.prefill_instance, f.decode_instance,
                          f.num_prompt_tokens, f.num_cached_tokens, f.num_output_tokens,
                          f.request_id, dict(f.cached_tokens_by_tier), dict(f.stage_ms))
    raise ValueError("GenerateResponse has neither chunk nor final")
