"""Refuse a request whose body is over the limit, in OpenAI's error shape (413).

A declared Content-Length over the limit is answered before a byte of the body
is read. A body without one (chunked) is read here up to the limit and handed on
whole; one that grows past it is answered 413 and the rest is never read. The
app behind parses JSON bodies in full anyway, so holding one here costs no copy
it would not make. (FastAPI's own ``max_body_size`` needs fastapi >= 0.165, and
vLLM pins fastapi below that; the API must serve beside it.)
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcluster.common import errors
from kvcluster.server.http.errors import APIError, error_response

PAYLOAD_TOO_LARGE = 413


class BodyLimit:
    """ASGI wrapper: bodies over ``max_body_bytes`` get a 413, the app never sees them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_body_bytes:
                await self._refuse(f"request body is {declared} bytes; the limit is "
                                   f"{self.max_body_bytes} (limits.max_message_bytes)",
                                   scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        body, rest = await self._read_chunked(receive)
        if body is None:
            await self._refuse(f"request body is larger than the limit of "
                               f"{self.max_body_bytes} bytes (limits.max_message_bytes)",
                               scope, receive, send)
            return
        await self.app(scope, _replay(body, rest, receive), send)

    async def _read_chunked(self, receive: Receive) -> tuple[bytes | None, list[Message]]:
        """The whole body (None: over the limit) and any non-body message read with it."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect: the app sees it
                return b"".join(parts), [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, []
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), []

    async def _refuse(self, message: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(APIError(errors.INVALID_ARGUMENT, message))
        response.status_code = PAYLOAD_TOO_LARGE
        await response(scope, receive, send)


def _replay(body: bytes, rest: list[Message], receive: Receive) -> Receive:
    """A receive that gives ``body`` as one message, then ``rest``, then the server's."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *rest]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope).get("content-length", ""))
    except ValueError:
        return None
