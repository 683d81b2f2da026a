"""A whole streamed answer, collected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kvcluster.common.requests import FinalEvent, StreamEvent, TokenEvent


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    final: FinalEvent
    """finish_reason, ttft_ms, instances, cached prompt tokens, ..."""

    @classmethod
    def collect(cls, events: Iterable[StreamEvent]) -> "GenerateResult":
        text: list[str] = []
        ids: list[int] = []
        final = None
        for event in events:
            if isinstance(event, TokenEvent):
                text.append(event.text)
                ids.extend(event.token_ids)
            else:
                final = event
        if final is None:
            raise RuntimeError("stream ended without a final message")
        return cls("".join(text), ids, final)
