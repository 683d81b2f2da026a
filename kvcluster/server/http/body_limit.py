"""Refuse a request whose declared body is over the limit, in OpenAI's error shape (413).

FastAPI's own ``max_body_size`` counts the bytes of bodies without a
Content-Length (chunked) and answers through our handlers; but for a declared
Content-Length over the limit it answers plain text. This wrapper, outside the
app, answers those first, before a byte of the body is read.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from kvcluster.common import errors
from kvcluster.server.http.errors import APIError, error_response

PAYLOAD_TOO_LARGE = 413


class DeclaredBodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope) if scope["type"] == "http" else None
        if declared is not None and declared > self.max_body_bytes:
            error = APIError(errors.INVALID_ARGUMENT, f"request body is {declared} bytes; the "
                             f"limit is {self.max_body_bytes} (limits.max_message_bytes)")
            response = error_response(error)
            response.status_code = PAYLOAD_TOO_LARGE
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope).get("content-length", ""))
    except ValueError:
        return None
