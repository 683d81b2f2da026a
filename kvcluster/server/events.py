"""The backend's token stream as the front ends send it: text deltas, stop strings, deadline.

Shared by both front ends (gRPC ``Generate`` and the OpenAI-compatible HTTP API)::

    backend.generate(request)   TokenEvent(ids)* FinalEvent
        -> text_events(...)     TokenEvent(ids, text delta)* [TokenEvent((), tail)] FinalEvent

A stop string that matches ends the request early (``asend(FINISH)``); the final
event then says ``finish_reason="stop"`` and counts only the tokens sent. Past
the request's deadline the stream raises :class:`TimeoutError`. Closing this
generator (``aclose()``, or cancelling the task iterating it) closes the
backend's generator, which frees the request's KV.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from kvcluster.common.errors import KVClusterError
from kvcluster.common.requests import FinalEvent, TokenEvent
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.server.backend import FINISH, GenerateBackend
from kvcluster.server.frontend_input import ParsedRequest
from kvcluster.server.frontend_text import TextStream


async def text_events(backend: GenerateBackend, tokenizer: Tokenizer,
                      parsed: ParsedRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
    """The backend's stream for ``parsed`` with text deltas and stop strings applied.

    Raises:
        KVClusterError: what the backend raised (its ``code`` says the status).
        TimeoutError: the request's deadline passed.
    """
    request = parsed.request
    text = TextStream(tokenizer, parsed.stop)
    num_sent = 0
    command = None
    stream = backend.generate(request)
    event = None
    try:
        while True:
            try:
                event = await _next(stream, command, request.deadline)
            except StopAsyncIteration:
                break
            command = None
            if isinstance(event, FinalEvent):
                break
            if text.stopped:
                continue  # a backend that ignored FINISH: drop what follows the stop
            delta = text.push(event.token_ids)
            num_sent += len(event.token_ids)
            yield TokenEvent(tuple(event.token_ids), delta)
            command = FINISH if text.stopped else None
    finally:
        await stream.aclose()
    tail = text.flush()
    if tail:
        yield TokenEvent((), tail)
    yield _final(event, request.request_id, num_sent if text.stopped else None)


# ---------------------------------------------------------------- helpers


async def _next(stream, command, deadline: float | None):
    """The stream's next event; TimeoutError past the deadline."""
    if deadline is None:
        return await stream.asend(command)
    try:
        return await asyncio.wait_for(stream.asend(command), max(deadline - time.time(), 0.0))
    except asyncio.TimeoutError as exc:
        raise TimeoutError("deadline exceeded") from exc


def _final(event, request_id: str, num_sent_if_stopped: int | None) -> FinalEvent:
    if not isinstance(event, FinalEvent):
        raise KVClusterError("backend ended the stream without a final event")  # INTERNAL
    fields = dict(event.__dict__, request_id=request_id)
    if num_sent_if_stopped is not None:  # a stop string ended the text
        fields.update(finish_reason="stop", num_output_tokens=num_sent_if_stopped)
    return FinalEvent(**fields)
