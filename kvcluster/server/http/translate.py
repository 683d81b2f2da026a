"""OpenAI request bodies -> the inputs the front ends share (prompt, sampling, stop, tenant).

Only the mapping lives here; tokenization, the chat template and the size checks
are :func:`kvcluster.server.frontend_input.admit_prompt`, the same as on gRPC.
"""

from __future__ import annotations

from kvcluster.common import errors
from kvcluster.common.config import ClusterConfig
from kvcluster.common.requests import ChatMessage
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.convert_generate import PromptInput
from kvcluster.server.http.errors import APIError
from kvcluster.server.http.request_models import (
    ChatCompletionRequest,
    CompletionRequest,
    CommonRequest,
)

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default when a request gives none (send 0 for greedy)."""
SALT_SEPARATOR = "\x00"


def prompt_of(body: ChatCompletionRequest | CompletionRequest) -> PromptInput:
    """The prompt to tokenize: chat messages (the model's template renders them) or
    a text completion's text or token ids."""
    if isinstance(body, ChatCompletionRequest):
        return PromptInput(messages=tuple(
            ChatMessage("system" if m.role == "developer" else m.role, m.text())
            for m in body.messages))
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (unsupported() refused more)
    if isinstance(prompt, str):
        return PromptInput(text=prompt)
    return PromptInput(token_ids=tuple(prompt))


def sampling_of(body: CommonRequest, max_new_tokens: int) -> SamplingParams:
    """The request's sampling parameters (INVALID_ARGUMENT naming a bad one)."""
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos)
    except ValueError as exc:
        raise APIError(errors.INVALID_ARGUMENT, str(exc)) from exc


def max_new_tokens_of(body: ChatCompletionRequest | CompletionRequest,
                      config: ClusterConfig) -> tuple[int, bool]:
    """``(max_new_tokens, given)``: the request's limit, or (not given) the largest allowed,
    which the caller trims to the context once the prompt's length is known."""
    given = body.max_new_tokens()
    limit = config.limits.max_new_tokens
    if given is None:
        return limit, False
    if given > limit:
        name = ("max_completion_tokens" if getattr(body, "max_completion_tokens", None)
                else "max_tokens")
        raise APIError(errors.INVALID_ARGUMENT,
                       f"{name}={given} is more than this server allows ({limit})", param=name)
    return given, True


def check_fits_context(num_prompt_tokens: int, max_new_tokens: int, given: bool,
                       max_model_len: int) -> int:
    """The new-token limit that fits the context (INVALID_ARGUMENT when none does)."""
    room = max_model_len - num_prompt_tokens
    if room < 1 or (given and max_new_tokens > room):
        raise APIError(errors.INVALID_ARGUMENT,
                       f"this model's context is {max_model_len} tokens; the request asks for "
                       f"{num_prompt_tokens + max_new_tokens} ({num_prompt_tokens} in the prompt, "
                       f"{max_new_tokens} to generate)",
                       param="max_tokens" if given and room >= 1 else None)
    return min(max_new_tokens, room)


def cache_namespace(tenant: str, cache_salt: str | None) -> str:
    """The request's cache namespace: its tenant, salted by ``cache_salt`` when given.

    The namespace is what backends hash KV under (``ExtraKeys.tenant_salt``), so a
    salted request shares KV only with requests of the same tenant and salt. The
    separator is NUL, which no salt (printable) contains: two different (tenant,
    salt) pairs never meet. Tenants come from the token table when auth is on; with
    auth off, any client may name any namespace anyway.
    """
    if cache_salt is None:
        return tenant
    return f"{tenant}{SALT_SEPARATOR}{cache_salt}"
