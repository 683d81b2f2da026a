"""The gRPC ``Generate`` front end: auth, limits, tokenization, text streaming.

Per call::

    bearer token -> tenant        (UNAUTHENTICATED when tokens are configured and it is bad)
    raw bytes -> GenerateRequest  (INVALID_ARGUMENT for bytes that do not parse)
    tenant rate limit             (RESOURCE_EXHAUSTED)
    tokenize + size/sampling checks (INVALID_ARGUMENT)
    backend.generate(request)     TokenEvent* FinalEvent -> chunk* final
                                  (KVClusterError -> status.grpc_status(code);
                                   deadline -> DEADLINE_EXCEEDED; a bug -> INTERNAL)

A client cancel or an expired deadline cancels the handler; the backend's
generator is then closed, which frees the request in the engine. Also served:
the standard health service (NOT_SERVING while the backend is unhealthy) and
reflection. Imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvcluster.common.config import ClusterConfig
from kvcluster.common.errors import InvalidRequestError, KVClusterError
from kvcluster.common.requests import FinalEvent, TokenEvent
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.observability.logs import request_context
from kvcluster.observability.metrics import FrontendMetrics
from kvcluster.proto.convert_generate import event_to_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from kvcluster.server import status
from kvcluster.server.backend import GenerateBackend
from kvcluster.server.events import text_events
from kvcluster.server.frontend_input import ParsedRequest, build_request, parse_wire
from kvcluster.server.limits import TenantRateLimiter
from kvcluster.transfer.security import ServerSecurity

log = logging.getLogger("kvcluster.frontend")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generate"].full_name  # kvcluster.v1.Generate
MAX_TENANT_CHARS = 128


class GenerateServicer:
    """Serves ``/kvcluster.v1.Generate/Generate`` (registered by :func:`add_to_server`)."""

    def __init__(self, backend: GenerateBackend, tokenizer: Tokenizer, config: ClusterConfig,
                 metrics: FrontendMetrics | None = None,
                 rate_limiter: TenantRateLimiter | None = None):
        self.backend = backend
        self.metrics = metrics or FrontendMetrics()
        self.tokenizer = tokenizer
        self.limits = config.limits
        self.security = ServerSecurity.from_config(config.security)
        self.rate_limiter = rate_limiter or TenantRateLimiter.from_config(self.limits)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the method with raw-bytes input, so bad bytes get INVALID_ARGUMENT."""
        handler = grpc.unary_stream_rpc_method_handler(
            self.Generate, request_deserializer=None,
            response_serializer=pb.GenerateResponse.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Generate": handler}),))

    async def Generate(self, data: bytes, context: grpc.aio.ServicerContext):
        """One call, counted by its final status code and while in flight."""
        self.metrics.in_flight.inc()
        code = "UNKNOWN"
        try:
            async for response in self._generate(data, context):
                yield response
            code = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(code).inc()

    # ------------------------------------------------------------------ private

    async def _generate(self, data: bytes, context: grpc.aio.ServicerContext):
        tenant = self.security.tenant(context.invocation_metadata())
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown bearer token (metadata authorization: "
                                "Bearer <token>)")
        try:
            parsed = self._admit(data, tenant, context.time_remaining())
        except KVClusterError as exc:
            log.info("rejected (%s): %s", exc.code, exc.message)
            await context.abort(status.grpc_status(exc.code), exc.message)
        with request_context(parsed.request.request_id):
            async for response in self._serve(parsed, context):
                yield response

    def _admit(self, data: bytes, tenant: str, time_remaining_s: float | None) -> ParsedRequest:
        msg = parse_wire(data)
        if not self.security.tokens:
            tenant = msg.tenant  # auth off (embedded default): the request names its tenant
        if len(tenant) > MAX_TENANT_CHARS:
            raise InvalidRequestError(f"tenant is longer than {MAX_TENANT_CHARS} chars")
        self.rate_limiter.acquire(tenant)
        return build_request(msg, tenant=tenant, tokenizer=self.tokenizer, limits=self.limits,
                             time_remaining_s=time_remaining_s)

    async def _serve(self, parsed: ParsedRequest, context: grpc.aio.ServicerContext):
        request = parsed.request
        log.info("generate tenant=%r prompt_tokens=%d max_new_tokens=%d", request.tenant,
                 request.num_prompt_tokens, request.params.max_new_tokens)
        began = time.perf_counter()
        token_times: list[float] = []
        try:
            async for event in self._events(parsed):
                if isinstance(event, TokenEvent) and event.token_ids:
                    token_times.extend([time.perf_counter()] * len(event.token_ids))
                yield event_to_proto(event)
                if isinstance(event, FinalEvent):
                    self.metrics.observe_stream(began, token_times, event)
                    self.metrics.output_tokens.inc(len(token_times))
                    log.info("done finish=%s ttft_ms=%.1f cached=%d/%d out=%d in %.3f s",
                             event.finish_reason, event.ttft_ms, event.num_cached_tokens,
                             event.num_prompt_tokens, event.num_output_tokens,
                             time.perf_counter() - began)
        except KVClusterError as exc:  # a worker's or backend's, whichever process raised it
            log.warning("request failed %s: %s", exc.code, exc.message)
            await context.abort(status.grpc_status(exc.code), exc.message)
        except TimeoutError:
            log.info("deadline exceeded after %.3f s", time.perf_counter() - began)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except asyncio.CancelledError:
            log.info("cancelled by the client after %.3f s", time.perf_counter() - began)
            raise
        except Exception:  # noqa: BLE001 - a bug must not leak details or look like success
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error (request id {request.request_id})")

    def _events(self, parsed: ParsedRequest):
        """The backend's stream with text deltas and stop strings applied."""
        return text_events(self.backend, self.tokenizer, parsed)


async def serve_frontend(backend: GenerateBackend, tokenizer: Tokenizer, config: ClusterConfig,
                         host: str = "127.0.0.1", port: int = 0,
                         health_interval_s: float = 1.0, metrics: FrontendMetrics | None = None,
                         rate_limiter: TenantRateLimiter | None = None
                         ) -> tuple["FrontendServer", int]:
    """Start the Generate, health and reflection services.

    Args:
        metrics: where calls are recorded (default: a fresh, private registry).
        rate_limiter: per-tenant buckets, shared with the HTTP front end (default: own).

    Returns:
        The started server (``await server.stop(grace)`` to end it) and its port.
    """
    options = [("grpc.max_receive_message_length", config.limits.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    GenerateServicer(backend, tokenizer, config, metrics, rate_limiter).add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    credentials = ServerSecurity.from_config(config.security).credentials()
    bound = (server.add_secure_port(address, credentials) if credentials
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    monitor = asyncio.create_task(_watch_health(backend, health_servicer, health_interval_s))
    log.info("front end listening on %s:%d (tls=%s, auth=%s)", host, bound,
             credentials is not None, bool(config.security.tokens))
    return FrontendServer(server, monitor, health_servicer), bound


class FrontendServer:
    """A started front end: the gRPC server plus its health watcher."""

    def __init__(self, server: grpc.aio.Server, monitor: asyncio.Task,
                 health_servicer: health.aio.HealthServicer):
        self.server = server
        self._monitor = monitor
        self._health = health_servicer

    async def stop(self, grace: float | None = None) -> None:
        self._monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._monitor
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)


# ---------------------------------------------------------------- helpers


def _code_name(context: grpc.aio.ServicerContext) -> str:
    """The status code an aborted call ends with."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code() on aio contexts
        return "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _watch_health(backend: GenerateBackend, servicer, interval_s: float) -> None:
    """Mirror ``backend.healthy()`` into the health service, for "" and the Generate service."""
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    while True:
        try:
            ok = await asyncio.wait_for(backend.healthy(), timeout=max(interval_s, 1.0))
        except Exception:  # noqa: BLE001 - a failing probe means unhealthy
            log.exception("backend health probe failed")
            ok = False
        for service in ("", SERVICE_NAME):
            await servicer.set(service, serving if ok else not_serving)
        await asyncio.sleep(interval_s)
