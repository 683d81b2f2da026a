"""One error root for everything a request can fail with, carrying its status (pure Python).

Workers, backends and front ends raise :class:`KVClusterError` (or a subclass); the
front ends turn ``code`` into a gRPC status or an HTTP status in exactly one place,
:mod:`kvcluster.server.status`. Codes are gRPC status names, so they read the same
in logs, metrics and both APIs. Every error pickles with its code (it crosses Ray).
"""

from __future__ import annotations

INVALID_ARGUMENT = "INVALID_ARGUMENT"
"""Bad input that can never succeed as sent (HTTP 400)."""
UNAUTHENTICATED = "UNAUTHENTICATED"
"""Missing or unknown credential (HTTP 401)."""
PERMISSION_DENIED = "PERMISSION_DENIED"
NOT_FOUND = "NOT_FOUND"
"""Unknown model or resource (HTTP 404)."""
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
"""Rate limit or a full queue: may succeed later (HTTP 429)."""
UNAVAILABLE = "UNAVAILABLE"
"""No live backend or worker (HTTP 503)."""
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
"""The request's deadline passed (HTTP 504)."""
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"
"""A bug or an unexpected failure (HTTP 500)."""

CODES = (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED,
         UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, INTERNAL)


class KVClusterError(Exception):
    """A request kvcluster cannot serve; ``code`` is one of :data:`CODES`."""

    code: str = INTERNAL

    def __init__(self, message: str, code: str | None = None):
        code = code or type(self).code
        if code not in CODES:
            raise ValueError(f"unknown status code {code!r} (known: {CODES})")
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable across processes (Ray), code included
        return (_rebuild, (type(self), self.message, self.code))


def _rebuild(cls: type[KVClusterError], message: str, code: str) -> KVClusterError:
    return cls(message, code)


class InvalidRequestError(KVClusterError):
    code = INVALID_ARGUMENT


class OverloadedError(KVClusterError):
    """A bounded queue is full: answer RESOURCE_EXHAUSTED instead of queueing."""

    code = RESOURCE_EXHAUSTED


class RateLimitedError(KVClusterError):
    """A tenant is over its request rate: may succeed later."""

    code = RESOURCE_EXHAUSTED


class UnavailableError(KVClusterError):
    code = UNAVAILABLE
