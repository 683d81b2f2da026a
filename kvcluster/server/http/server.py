"""Start the HTTP API with uvicorn on the running event loop (the gRPC server's loop).

    server, port = await serve_http(backend, tokenizer, config, model_names=[...])
    ...
    await server.stop(grace_s)

The socket is bound here, so a port in use is an OSError for the caller (uvicorn
itself would ``sys.exit``). Signals stay with the process's owner (``kvcluster
serve`` installs its own handlers), and logging with ours. TLS (mutual with
``security.tls_ca``) uses the same certificate files as the gRPC front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn
from prometheus_client import CollectorRegistry

from kvcluster.common.config import ClusterConfig
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.observability.metrics import FrontendMetrics
from kvcluster.server.backend import GenerateBackend
from kvcluster.server.http.app import build_app
from kvcluster.server.http.body_limit import BodyLimit
from kvcluster.server.http.serving import OpenAIServing
from kvcluster.server.limits import TenantRateLimiter
from kvcluster.transfer.security import ServerSecurity

log = logging.getLogger("kvcluster.http")
START_TIMEOUT_S = 30.0


async def serve_http(backend: GenerateBackend, tokenizer: Tokenizer, config: ClusterConfig, *,
                     model_names: list[str], host: str = "127.0.0.1", port: int = 0,
                     metrics: FrontendMetrics | None = None,
                     metrics_registry: CollectorRegistry | None = None,
                     rate_limiter: TenantRateLimiter | None = None) -> tuple["HttpServer", int]:
    """Start the OpenAI-compatible API on ``host:port`` (0: a free port).

    Args:
        model_names: names a request's ``model`` may use (e.g. the configured name, the id).
        metrics: where requests are recorded (share the gRPC front end's to count both).
        metrics_registry: what ``/metrics`` serves (default: ``metrics``' registry).
        rate_limiter: per-tenant buckets (share the gRPC front end's: one rate per tenant).
    Returns:
        The started server and its port.
    Raises:
        OSError: the address cannot be bound.
    """
    metrics = metrics or FrontendMetrics()
    security = ServerSecurity.from_config(config.security)
    serving = OpenAIServing(backend, tokenizer, config, model_names, metrics,
                            rate_limiter or TenantRateLimiter.from_config(config.limits))
    app = BodyLimit(build_app(serving, security, metrics_registry),
                    config.limits.max_message_bytes)
    uv_config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                               log_level="warning", timeout_graceful_shutdown=5,
                               **_tls_options(security))
    uv_config.load()  # here, so a bad certificate raises in the caller
    server = _Server(uv_config)
    sock = _bind(host, port)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="kvcluster-http")
    await _started(server, task)
    bound = sock.getsockname()[1]
    log.info("HTTP API listening on %s:%d (tls=%s, auth=%s)", host, bound,
             bool(security.tls_cert), bool(security.tokens))
    return HttpServer(server, task, sock), bound


class HttpServer:
    """A started HTTP API: uvicorn serving as a task on the loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, sock: socket.socket):
        self._server = server
        self._task = task
        self._sock = sock

    @property
    def tls(self) -> bool:
        return self._server.config.ssl is not None

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, give open requests ``grace_s`` (None: 5 s), then cancel them."""
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(grace_s, 0.0)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sock.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the process's owner handles SIGINT/SIGTERM and calls stop()


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _tls_options(security: ServerSecurity) -> dict:
    if not security.tls_cert:
        return {}
    options = {"ssl_certfile": security.tls_cert, "ssl_keyfile": security.tls_key}
    if security.tls_client_ca:
        options.update(ssl_ca_certs=security.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


async def _started(server: uvicorn.Server, task: asyncio.Task) -> None:
    """Wait until uvicorn accepts connections; its start-up error if it failed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server stopped while starting")
        if loop.time() > end:
            server.should_exit = True
            raise TimeoutError(f"the HTTP server did not start within {START_TIMEOUT_S} s")
        await asyncio.sleep(0.005)
