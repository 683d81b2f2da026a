"""What the front end serves from: a backend that turns one request into a token stream.

Implementations: :class:`kvcluster.server.local_backend.LocalBackend` (one
in-process engine, the embedded default) and the Ray cluster backend. The front
end owns tokenization, limits, auth and text; a backend sees token ids only.

Stream contract of :meth:`GenerateBackend.generate`:

    TokenEvent* FinalEvent          (exactly one final event, then the end)

Closing the generator early (``aclose()``, or cancelling the task iterating
it) must free the request's resources. The front end may ``asend(FINISH)``
instead of ``None`` to ask for an early, orderly end (a stop string matched):
a backend that supports it frees the request and yields its FinalEvent next; one
that ignores it simply goes on, and the front end drops the extra tokens.
"""

from __future__ import annotations

import abc
from typing import AsyncIterator

from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent

RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
INTERNAL = "INTERNAL"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
BACKEND_CODES = (RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL, INVALID_ARGUMENT, DEADLINE_EXCEEDED)

FINISH = "finish"
"""Sent into a backend's generator (``asend``) to end the request now with a FinalEvent."""


class BackendError(Exception):
    """A request the backend cannot serve; ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str):
        if code not in BACKEND_CODES:
            raise ValueError(f"unknown backend error code {code!r} (known: {BACKEND_CODES})")
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable across processes (Ray)
        return (BackendError, (self.code, self.message))


class GenerateBackend(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream the request's tokens, then one FinalEvent.

        Implemented as ``async def generate(...)`` containing ``yield``.

        Raises:
            BackendError: RESOURCE_EXHAUSTED (overloaded), UNAVAILABLE, INTERNAL, ...
        """

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """True while the backend can accept requests."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Fail in-flight requests (UNAVAILABLE) and release everything."""
