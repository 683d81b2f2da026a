"""Errors in OpenAI's shape, with the HTTP status of :mod:`kvcluster.server.status`.

    HTTP 4xx/5xx  {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

``code`` is the error's status name (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...,
as on gRPC), except where OpenAI clients look for a specific one
(``model_not_found``). Any exception with a ``code`` attribute naming a status
(a KVClusterError) maps through the same table; a
TimeoutError is DEADLINE_EXCEEDED; anything else is INTERNAL, without details.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvcluster.common import errors
from kvcluster.observability.metrics import FrontendMetrics
from kvcluster.server.http.response_models import ErrorBody, ErrorDetail
from kvcluster.server.status import http_status, openai_error_type

log = logging.getLogger("kvcluster.http")


class APIError(Exception):
    """A request the HTTP API answers with an error status."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 error_code: str | None = None):
        super().__init__(message)
        self.code = code if code in errors.CODES else errors.INTERNAL
        self.message = message
        self.param = param
        self.error_code = error_code or self.code

    @property
    def status(self) -> int:
        return http_status(self.code)

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=openai_error_type(self.code),
                             param=self.param, code=self.error_code)
        return ErrorBody(error=detail).model_dump()


def api_error_of(exc: BaseException, request_id: str = "") -> APIError:
    """The API error for anything a request's serving raised."""
    if isinstance(exc, APIError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in errors.CODES:
        return APIError(code, str(getattr(exc, "message", "") or exc))
    if isinstance(exc, TimeoutError):
        return APIError(errors.DEADLINE_EXCEEDED, "deadline exceeded")
    log.error("internal error (request id %s)", request_id, exc_info=exc)
    return APIError(errors.INTERNAL, f"internal error (request id {request_id})")


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if error.code == errors.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def install_handlers(app: FastAPI, metrics: FrontendMetrics) -> None:
    """Every error the app can answer, in OpenAI's shape (and counted by its code)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(exc.code).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests.labels(errors.INVALID_ARGUMENT).inc()
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _code_of_status(exc.status_code)
        error = APIError(code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


# ---------------------------------------------------------------- helpers


def _validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first bad field (``messages.0.role``), as OpenAI answers."""
    problems = exc.errors()
    first = problems[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        where = loc[0] if loc else 0
        return APIError(errors.INVALID_ARGUMENT,
                        f"request body is not valid JSON: {reason} (at byte {where})")
    if not loc:
        return APIError(errors.INVALID_ARGUMENT,
                        f"request body must be a JSON object: {first.get('msg')}")
    param = _field_path(loc)
    # A union ("stop": a string or a list of strings) fails once per member.
    members = [p for p in problems if _field_path(p.get("loc", ())).startswith(param)]
    if len(members) == 1:
        return APIError(errors.INVALID_ARGUMENT, f"{param}: {first.get('msg')}", param=param)
    # Value errors first: they come from the member the input was meant as.
    members.sort(key=lambda p: str(p.get("type", "")).endswith("_type"))
    reasons = list(dict.fromkeys(f"{_field_path(p['loc'])}: {p.get('msg')}" for p in members))
    reasons = "; ".join(reasons[:3])
    return APIError(errors.INVALID_ARGUMENT,
                    f"{param} matches none of its accepted forms ({reasons})", param=param)


def _field_path(loc) -> str:
    """``("body", "stop", "list[str]", 0)`` -> ``stop.0``: field names and indices only."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if not _is_type_tag(p))


def _is_type_tag(part: str) -> bool:
    """A union member's tag in a location (``str``, ``list[str]``, ``TextPart``)."""
    return (part in ("str", "int", "float", "bool", "dict", "list", "none")
            or "[" in part or part.startswith(("function-", "constrained-")) or part[:1].isupper())


def _code_of_status(status: int) -> str:
    return {400: errors.INVALID_ARGUMENT, 401: errors.UNAUTHENTICATED,
            403: errors.PERMISSION_DENIED, 404: errors.NOT_FOUND,
            429: errors.RESOURCE_EXHAUSTED, 503: errors.UNAVAILABLE,
            504: errors.DEADLINE_EXCEEDED}.get(
        status, errors.INVALID_ARGUMENT if status < 500 else errors.INTERNAL)
