"""Deadlines, cancellation and retries end to end: the engine must end up holding nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from kvcluster.client import AsyncKVClusterClient, ClientOptions, GenerateError, KVClusterClient
from kvcluster.common.requests import TokenEvent
from kvcluster.common.sampling import SamplingParams
from tests.frontend.conftest import free_port

SLOW_STEP_S = 0.02  # 200 tokens take >= 4 s: freeing within 1 s proves the cancel


def test_deadline_exceeded_frees_the_request(start_server):
    server = start_server(min_step_interval_s=SLOW_STEP_S)
    began = time.monotonic()
    with KVClusterClient(server.target) as client, pytest.raises(GenerateError) as info:
        client.generate("deadline", params=SamplingParams(max_new_tokens=200), timeout_s=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - began < 1.5
    server.wait_freed(timeout_s=1.0)


def test_sync_client_cancel_frees_the_request(start_server):
    server = start_server(min_step_interval_s=SLOW_STEP_S)
    with KVClusterClient(server.target) as client:
        stream = client.generate_stream("cancel me", params=SamplingParams(max_new_tokens=200))
        first = [next(stream), next(stream)]
        assert server.backend.num_engine_requests == 1
        stream.close()  # the caller stops iterating early
    assert all(isinstance(e, TokenEvent) for e in first)
    server.wait_freed(timeout_s=1.0)


def test_async_client_cancel_frees_the_request(start_server):
    server = start_server(min_step_interval_s=SLOW_STEP_S)

    async def main():
        async with AsyncKVClusterClient(server.target) as client:
            received = 0
            async for _ in client.generate_stream("cancel me too",
                                                  params=SamplingParams(max_new_tokens=200)):
                received += 1
                if received == 3:
                    break
            return received

    assert asyncio.run(main()) == 3
    server.wait_freed(timeout_s=1.0)


def test_task_cancellation_frees_the_request(start_server):
    server = start_server(min_step_interval_s=SLOW_STEP_S)

    async def main():
        async with AsyncKVClusterClient(server.target) as client:
            task = asyncio.create_task(client.generate(
                "cancelled task", params=SamplingParams(max_new_tokens=200)))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    server.wait_freed(timeout_s=1.0)


def test_client_retries_unavailable_until_the_server_starts(start_server):
    port = free_port()
    options = ClientOptions(target=f"127.0.0.1:{port}", max_retries=12, backoff_initial_s=0.05,
                            backoff_max_s=0.4, timeout_s=30)
    outcome = {}

    def run_client():
        outcome["began"] = time.monotonic()
        with KVClusterClient(options=options) as client:
            outcome["result"] = client.generate("retry", params=SamplingParams(max_new_tokens=3))

    thread = threading.Thread(target=run_client)
    thread.start()
    time.sleep(0.6)  # the first attempts meet a closed port
    server_started = time.monotonic()
    start_server(port=port)
    thread.join(30)
    assert server_started - outcome["began"] >= 0.5
    assert len(outcome["result"].token_ids) == 3


def test_client_gives_up_after_its_retries(start_server):
    options = ClientOptions(target=f"127.0.0.1:{free_port()}", max_retries=2,
                            backoff_initial_s=0.05, timeout_s=10)
    began = time.monotonic()
    with KVClusterClient(options=options) as client, pytest.raises(GenerateError) as info:
        client.generate("nobody home")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - began < 5
