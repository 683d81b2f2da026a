"""A real front end (gRPC on 127.0.0.1) over a real LocalBackend with the tiny model.

Each server runs its own asyncio loop in a background thread, so blocking
clients, asyncio clients and raw stubs in the test thread all talk to it over
real sockets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace

import pytest

from kvcluster.common.config import (
    ClusterConfig,
    EngineConfig,
    LimitsConfig,
    SecurityConfig,
)
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.tiny import write_tiny_model
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.server.frontend import serve_frontend
from kvcluster.server.local_backend import LocalBackend

BLOCK_SIZE = 4
NUM_BLOCKS = 256


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("frontend-tiny") / "llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir)


def make_config(limits: LimitsConfig | None = None,
                security: SecurityConfig | None = None) -> ClusterConfig:
    return ClusterConfig(engine=EngineConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                                             max_model_len=512),
                         limits=limits or LimitsConfig(max_prompt_tokens=400, max_new_tokens=256,
                                                       requests_per_s=1000.0, burst=1000),
                         security=security or SecurityConfig())


class ServerThread:
    """LocalBackend + front end on their own event loop thread."""

    def __init__(self, tiny_dir, tokenizer, config: ClusterConfig, port: int = 0,
                 max_queue: int = 8, min_step_interval_s: float = 0.0,
                 health_interval_s: float = 0.1):
        runner = ModelRunner.from_pretrained(tiny_dir, engine_config=config.engine)
        self.backend = LocalBackend(LLMEngine(runner, stop_on_eos=False), max_queue=max_queue,
                                    min_step_interval_s=min_step_interval_s)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server, self.port = self.call(serve_frontend(
            self.backend, tokenizer, config, port=port, health_interval_s=health_interval_s))
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_freed(self, timeout_s: float = 10.0) -> None:
        """Wait until the engine holds no request and every KV block is free again."""
        blocks = self.backend.engine.blocks
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if (self.backend.num_in_flight == 0 and self.backend.num_engine_requests == 0
                    and blocks.num_free == NUM_BLOCKS):
                return
            time.sleep(0.02)
        raise AssertionError(f"request not freed: in_flight={self.backend.num_in_flight} "
                             f"engine={self.backend.num_engine_requests} "
                             f"free_blocks={blocks.num_free}/{NUM_BLOCKS}")

    def stop(self) -> None:
        self.call(self.server.stop(None))
        self.call(self.backend.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def start_server(tiny_dir, tokenizer):
    """``start_server(config=None, **kwargs) -> ServerThread``; all stopped at teardown."""
    servers = []

    def start(config: ClusterConfig | None = None, **kwargs) -> ServerThread:
        servers.append(ServerThread(tiny_dir, tokenizer, config or make_config(), **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(tiny_dir, tokenizer):
    """One plain server (no auth, generous limits) for the read-only tests of a module."""
    server = ServerThread(tiny_dir, tokenizer, make_config())
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limits(**overrides) -> LimitsConfig:
    base = LimitsConfig(max_prompt_tokens=400, max_new_tokens=256, requests_per_s=1000.0,
                        burst=1000)
    return replace(base, **overrides)
