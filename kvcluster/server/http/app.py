"""The FastAPI app of the OpenAI-compatible API.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   (bearer token)
    GET  /health  (200 while the backend is healthy, else 503)
    GET  /metrics (Prometheus text: the process's registries, as on router.metrics_port)

Auth: ``Authorization: Bearer <token>`` maps to a tenant through
``security.tokens``, exactly as on gRPC (no tokens configured: auth off, the
shared tenant ""). Bodies over ``limits.max_message_bytes`` are refused (413).
A client that disconnects before its answer is complete cancels the request:
a non-streamed one is raced against the connection, a streamed one is closed
by the response (see serving.py).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvcluster.common import errors
from kvcluster.server.http.errors import APIError, error_response, install_handlers
from kvcluster.server.http.request_models import ChatCompletionRequest, CompletionRequest
from kvcluster.server.http.response_models import ModelCard, ModelList
from kvcluster.server.http.serving import OpenAIServing
from kvcluster.transfer.security import AUTH_HEADER, ServerSecurity

HEALTH_TIMEOUT_S = 2.0
REQUEST_ID_HEADER = "x-request-id"


def build_app(serving: OpenAIServing, security: ServerSecurity,
              metrics_registry: CollectorRegistry | None = None) -> FastAPI:
    """The app serving ``serving``'s model(s).

    Args:
        metrics_registry: what ``/metrics`` exports (None: the front end's own metrics).
    """
    app = FastAPI(title="kvcluster", summary="OpenAI-compatible API")
    install_handlers(app, serving.metrics)
    tenant_of = _authenticator(security)
    registry = metrics_registry or serving.metrics.registry
    created = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request,
                   tenant: str = Depends(tenant_of)) -> Response:
        return await _until_disconnect(request, serving,
                                       serving.chat(body, tenant, _request_id(request)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          tenant: str = Depends(tenant_of)) -> Response:
        return await _until_disconnect(request, serving,
                                       serving.completion(body, tenant, _request_id(request)))

    @app.get("/v1/models", dependencies=[Depends(tenant_of)])
    async def models() -> ModelList:
        max_len = serving.config.engine.max_model_len
        return ModelList(data=[ModelCard(id=name, created=created, max_model_len=max_len)
                               for name in serving.model_names])

    @app.get("/health")
    async def health() -> Response:
        try:
            ok = await asyncio.wait_for(serving.backend.healthy(), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a failing probe means unhealthy
            ok = False
        if ok:
            return JSONResponse({"status": "ok"})
        return error_response(APIError(errors.UNAVAILABLE, "no healthy backend"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ---------------------------------------------------------------- helpers


def _authenticator(security: ServerSecurity):
    """A dependency answering the caller's tenant, or 401."""

    async def tenant_of(request: Request) -> str:
        if not security.tokens:
            return ""
        header = request.headers.get(AUTH_HEADER, "")
        tenant = security.tenant([(AUTH_HEADER, header)])
        if tenant is None:
            raise APIError(errors.UNAUTHENTICATED, "missing or unknown bearer token "
                           "(header Authorization: Bearer <token>)", error_code="invalid_api_key")
        return tenant

    return tenant_of


def _request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER, "")


async def _until_disconnect(request: Request, serving: OpenAIServing, answer) -> Response:
    """Run ``answer`` unless the client disconnects first; then cancel it (which closes
    the backend's stream and frees the request)."""
    work = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled() and work.done():
        return work.result()
    await asyncio.gather(work, return_exceptions=True)  # let it close the stream
    serving.count_cancelled()
    return Response(status_code=499)  # nobody reads it: the client is gone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
