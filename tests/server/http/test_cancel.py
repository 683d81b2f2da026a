"""A client that goes away cancels its request: the engine frees it long before it would
have finished (200 tokens at 50 ms a step take 10 s; each test allows 3 s)."""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import pytest

from tests.server.http.conftest import MODEL

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 200}
FREED_WITHIN_S = 3.0


@pytest.fixture
def slow_server(start_http):
    return start_http(min_step_interval_s=0.05)


def test_closing_a_raw_sse_stream_frees_the_request(slow_server):
    with httpx.stream("POST", f"{slow_server.base_url}/chat/completions",
                      json={**LONG, "stream": True}) as resp:
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or line == "" for line in received)
        assert slow_server.backend.num_engine_requests == 1
    slow_server.wait_freed(FREED_WITHIN_S)
    assert slow_server.count("CANCELLED") == 1
    assert slow_server.count("OK") == 0


def test_closing_an_sdk_stream_frees_the_request(slow_server):
    stream = slow_server.client().chat.completions.create(stream=True, **LONG)
    chunks = [next(stream) for _ in range(3)]
    assert chunks[0].choices[0].delta.role == "assistant"
    stream.close()
    slow_server.wait_freed(FREED_WITHIN_S)


def test_a_client_timeout_cancels_a_non_streamed_request(slow_server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.base_url}/chat/completions", json=LONG, timeout=0.5)
    slow_server.wait_freed(FREED_WITHIN_S)
    assert slow_server.count("CANCELLED") == 1


def test_cancelling_an_async_stream_frees_the_request(slow_server):
    async def run():
        async with slow_server.async_client() as client:
            stream = await client.chat.completions.create(stream=True, **LONG)
            async for _ in stream:
                break
            await stream.close()

    asyncio.run(run())
    slow_server.wait_freed(FREED_WITHIN_S)


def test_a_disconnect_before_the_first_token_frees_the_request(start_http):
    # 1 s between engine steps: a request that arrives while another one streams waits
    # up to 1 s for its prefill, and its client leaves before that
    server = start_http(min_step_interval_s=1.0)
    url = f"{server.base_url}/chat/completions"
    with httpx.stream("POST", url, json={**LONG, "stream": True}) as first:
        lines = first.iter_lines()
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**LONG, "stream": True}, timeout=0.2)
        end = time.monotonic() + FREED_WITHIN_S
        while server.count("CANCELLED") < 1 or server.backend.num_in_flight > 1:
            assert time.monotonic() < end, "the waiting request was not freed"
            time.sleep(0.02)
        assert server.backend.num_in_flight == 1  # the first one streams on
    server.wait_freed(FREED_WITHIN_S)
    assert server.count("CANCELLED") == 2
