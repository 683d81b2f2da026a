"""Turn a wire ``GenerateRequest`` into a checked :class:`GenerateRequest` of token ids.

:func:`build_request` reads the gRPC message; :func:`admit_prompt` does the rest
(tokenize, chat template, sampling and size checks) and is shared with the HTTP
front end, which builds the same inputs from its JSON body.
Everything a request can get wrong is answered here, before any backend work,
with an :class:`~kvcluster.common.errors.InvalidRequestError` (INVALID_ARGUMENT) for
requests that can never succeed (bad bytes, bad sampling values, empty or
too-long prompts, unknown token ids).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from kvcluster.common.config import LimitsConfig
from kvcluster.common.errors import InvalidRequestError
from kvcluster.common.requests import GenerateRequest
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.proto import convert_generate as convert
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from kvcluster.server.limits import check_request_size

MIN_TEMPERATURE = 1e-5
"""Smaller positive temperatures overflow the logits; they are treated as greedy (0)."""
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class ParsedRequest:
    request: GenerateRequest
    stop: tuple[str, ...]
    """Stop strings; the front end matches them in the streamed text."""


def parse_wire(data: bytes) -> pb.GenerateRequest:
    """Deserialise raw request bytes (INVALID_ARGUMENT when they are not a GenerateRequest)."""
    try:
        return pb.GenerateRequest.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidRequestError(f"request is not a valid GenerateRequest: {exc}") from exc


def build_request(msg: pb.GenerateRequest, *, tenant: str, tokenizer: Tokenizer,
                  limits: LimitsConfig, time_remaining_s: float | None) -> ParsedRequest:
    """Validate, tokenize and size-check ``msg`` for ``tenant``.

    Args:
        tenant: the authenticated tenant (or the request's own when auth is off).
        time_remaining_s: the call's deadline, seconds from now (None: no deadline).
    Raises:
        InvalidRequestError: a message naming the bad field.
    """
    try:
        default_max = min(convert.DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
        params = convert.sampling_from_proto(msg, default_max)
        stop = convert.stop_strings_from_proto(msg)
        prompt = convert.prompt_from_proto(msg)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    return admit_prompt(prompt, params, stop, tenant=tenant, tokenizer=tokenizer, limits=limits,
                        slo_ms=msg.slo_ms, request_id=msg.request_id,
                        time_remaining_s=time_remaining_s)


def admit_prompt(prompt: convert.PromptInput, params: SamplingParams, stop: tuple[str, ...], *,
                 tenant: str, tokenizer: Tokenizer, limits: LimitsConfig, slo_ms: float = 0.0,
                 request_id: str = "", time_remaining_s: float | None = None) -> ParsedRequest:
    """Tokenize and check a request given as our own types (both front ends end here).

    Args:
        prompt: text, chat messages (rendered with the model's chat template) or token ids.
        request_id: the caller's id ("" or absent: a fresh one).
    Raises:
        InvalidRequestError: a message naming the bad field.
    """
    try:
        params = _greedy_if_tiny_temperature(params)
        stop = _checked_stop(stop)
        prompt_ids = _prompt_ids(prompt, tokenizer)
        if not slo_ms >= 0:  # also rejects NaN
            raise ValueError(f"slo_ms must be >= 0, got {slo_ms}")
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc
    check_request_size(limits, num_prompt_tokens=len(prompt_ids),
                       max_new_tokens=params.max_new_tokens)
    deadline = None if time_remaining_s is None else time.time() + time_remaining_s
    request = GenerateRequest(_request_id(request_id), tenant, prompt_ids, params,
                              float(slo_ms), deadline)
    return ParsedRequest(request, stop)


# ---------------------------------------------------------------- helpers


def _prompt_ids(prompt: convert.PromptInput, tokenizer: Tokenizer) -> tuple[int, ...]:
    if prompt.text is not None:
        return tuple(tokenizer.encode(prompt.text))
    if prompt.messages is not None:
        if not prompt.messages:
            raise ValueError("chat has no messages")
        turns = [{"role": m.role, "content": m.content} for m in prompt.messages]
        return tuple(tokenizer.encode_chat(turns))
    vocab_size = tokenizer.vocab_size
    bad = [t for t in prompt.token_ids if t >= vocab_size]
    if bad:
        raise ValueError(f"prompt_token_ids has id {bad[0]} outside the vocabulary "
                         f"(size {vocab_size})")
    return prompt.token_ids


def _greedy_if_tiny_temperature(params: SamplingParams) -> SamplingParams:
    if 0 < params.temperature < MIN_TEMPERATURE:
        return dataclasses.replace(params, temperature=0.0)
    return params


def _checked_stop(stop: tuple[str, ...]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"stop strings are limited to {MAX_STOP_CHARS} characters")
    return stop


def _request_id(given: str) -> str:
    if len(given) > 128 or not given.isprintable():
        raise InvalidRequestError("request_id must be at most 128 printable characters")
    return given or uuid.uuid4().hex
