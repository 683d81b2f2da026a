"""The one table from :mod:`kvcluster.common.errors` codes to gRPC and HTTP statuses.

Both front ends (gRPC, HTTP) map errors here and nowhere else, so a code answers
the same on either API.
"""

from __future__ import annotations

import grpc

from kvcluster.common import errors

_HTTP = {
    errors.INVALID_ARGUMENT: (400, "invalid_request_error"),
    errors.UNAUTHENTICATED: (401, "authentication_error"),
    errors.PERMISSION_DENIED: (403, "permission_error"),
    errors.NOT_FOUND: (404, "not_found_error"),
    errors.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    errors.CANCELLED: (499, "cancelled"),
    errors.INTERNAL: (500, "internal_error"),
    errors.UNAVAILABLE: (503, "service_unavailable"),
    errors.DEADLINE_EXCEEDED: (504, "timeout"),
}
assert set(_HTTP) == set(errors.CODES), "every code needs an HTTP status"


def grpc_status(code: str) -> grpc.StatusCode:
    """The gRPC status of an error code (INTERNAL for an unknown one)."""
    return grpc.StatusCode.__members__.get(code, grpc.StatusCode.INTERNAL)


def http_status(code: str) -> int:
    """The HTTP status of an error code (500 for an unknown one)."""
    return _HTTP.get(code, _HTTP[errors.INTERNAL])[0]


def openai_error_type(code: str) -> str:
    """The ``error.type`` an OpenAI-compatible API answers with for this code."""
    return _HTTP.get(code, _HTTP[errors.INTERNAL])[1]
