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

FINISH = "finish"
"""Sent into a backend's generator (``asend``) to end the request now with a FinalEvent."""


class GenerateBackend(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream the request's tokens, then one FinalEvent.

        Implemented as ``async def generate(...)`` containing ``yield``.

        Raises:
            kvcluster.common.errors.KVClusterError: a request the backend cannot serve, with
                its code (OverloadedError: RESOURCE_EXHAUSTED, UnavailableError, ...),
                a worker's included. Any other exception is a bug (the front end answers
                INTERNAL).
        """

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """True while the backend can accept requests."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Fail in-flight requests (UNAVAILABLE) and release everything."""
