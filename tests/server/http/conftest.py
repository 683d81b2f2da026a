"""A real HTTP API (uvicorn on 127.0.0.1) over a real LocalBackend with the tiny model.

The gRPC front end runs on the same event loop (as ``kvcluster serve`` runs them),
sharing the metrics and the rate limiter; each server's loop lives in a
background thread, so the blocking and the asyncio SDK clients in the test
thread talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from kvcluster.common.config import ClusterConfig
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.runner import ModelRunner
from kvcluster.observability.metrics import FrontendMetrics
from kvcluster.server.frontend import serve_frontend
from kvcluster.server.http import serve_http
from kvcluster.server.limits import TenantRateLimiter
from kvcluster.server.local_backend import LocalBackend
from tests.frontend.conftest import limits, make_config, tiny_dir, tokenizer  # noqa: F401

MODEL = "tiny"
MODEL_ALIAS = "tiny-llama-0"


class HttpServerThread:
    """LocalBackend + HTTP API + gRPC front end on one event loop thread."""

    def __init__(self, tiny_dir, tokenizer, config: ClusterConfig, max_queue: int = 8,
                 min_step_interval_s: float = 0.0):
        runner = ModelRunner.from_pretrained(tiny_dir, engine_config=config.engine)
        self.backend = LocalBackend(LLMEngine(runner, stop_on_eos=False), max_queue=max_queue,
                                    min_step_interval_s=min_step_interval_s)
        self.metrics = FrontendMetrics()
        limiter = TenantRateLimiter.from_config(config.limits)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.http, self.port = self.call(serve_http(
            self.backend, tokenizer, config, model_names=[MODEL, MODEL_ALIAS],
            metrics=self.metrics, rate_limiter=limiter))
        self.grpc, self.grpc_port = self.call(serve_frontend(
            self.backend, tokenizer, config, metrics=self.metrics, rate_limiter=limiter))
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_freed(self, timeout_s: float = 10.0) -> None:
        """Wait until no request is in flight and the engine holds none."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.backend.num_in_flight == 0 and self.backend.num_engine_requests == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"request not freed: in_flight={self.backend.num_in_flight} "
                             f"engine={self.backend.num_engine_requests}")

    def count(self, code: str) -> float:
        value = self.metrics.registry.get_sample_value("kvcluster_frontend_requests_total",
                                                       {"code": code})
        return value or 0.0

    def stop(self) -> None:
        self.call(self.http.stop(1))
        self.call(self.grpc.stop(None))
        self.call(self.backend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def http_server(tiny_dir, tokenizer):
    """One plain server (no auth, generous limits) shared by a module's tests."""
    server = HttpServerThread(tiny_dir, tokenizer, make_config())
    yield server
    server.stop()


@pytest.fixture
def start_http(tiny_dir, tokenizer):
    """``start_http(config=None, **kwargs) -> HttpServerThread``; all stopped at teardown."""
    servers = []

    def start(config: ClusterConfig | None = None, **kwargs) -> HttpServerThread:
        servers.append(HttpServerThread(tiny_dir, tokenizer, config or make_config(), **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
