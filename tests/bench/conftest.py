"""bench.serve's tests reuse the HTTP API tests' real server: uvicorn on 127.0.0.1 over a
LocalBackend with the tiny model (tests/server/http/conftest.py)."""

from tests.server.http.conftest import http_server  # noqa: F401
from tests.frontend.conftest import tiny_dir, tokenizer  # noqa: F401
