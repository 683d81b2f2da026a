"""Build the wire request from the client's keyword arguments."""

from __future__ import annotations

from typing import Sequence

from kvcluster.common.requests import ChatMessage
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.convert_generate import PromptInput, request_to_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb


def build_request(prompt: str | None = None, *,
                  messages: Sequence[ChatMessage | dict] | None = None,
                  token_ids: Sequence[int] | None = None,
                  params: SamplingParams | None = None, stop: Sequence[str] = (),
                  tenant: str = "", slo_ms: float = 0.0, request_id: str = "") -> pb.GenerateRequest:
    """Exactly one of ``prompt`` (text), ``messages`` (chat) or ``token_ids``."""
    if messages is not None:
        messages = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])
                         for m in messages)
    prompt_input = PromptInput(text=prompt, messages=messages,
                               token_ids=None if token_ids is None else tuple(token_ids))
    return request_to_proto(prompt_input, params or SamplingParams(), stop=stop, tenant=tenant,
                            slo_ms=slo_ms, request_id=request_id)
