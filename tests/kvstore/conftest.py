"""Fixtures for the kvstore tests."""

import shutil

import pytest

from tests.kvstore.helpers import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
