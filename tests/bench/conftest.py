"""bench.serve's tests reuse the HTTP API tests' real server: uvicorn on 127.0.0.1 over a
LocalBackend with the tiny model (tests/server/http/conftest.py); the round-robin tests
get a second one of its own."""

import pytest

from tests.frontend.conftest import make_config, tiny_dir, tokenizer  # noqa: F401
from tests.server.http.conftest import HttpServerThread, http_server  # noqa: F401


@pytest.fixture(scope="module")
def second_http_server(tiny_dir, tokenizer):  # noqa: F811
    """Another plain server, with a KV cache of its own (round-robin's other side)."""
    server = HttpServerThread(tiny_dir, tokenizer, make_config())
    yield server
    server.stop()
