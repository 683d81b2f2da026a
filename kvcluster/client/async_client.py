"""asyncio client (grpc.aio): ``async for event in client.generate_stream(...)``."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from kvcluster.client.options import ClientOptions
from kvcluster.client.request import build_request
from kvcluster.client.result import GenerateResult
from kvcluster.client.sync_client import GenerateError, _remaining
from kvcluster.common.requests import StreamEvent
from kvcluster.proto.convert_generate import event_from_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2_grpc


class AsyncKVClusterClient:
    """Same contract as :class:`KVClusterClient`, for asyncio code."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None):
        self.options = (options or ClientOptions()).with_target(target)
        creds = self.options.credentials()
        opts = self.options.channel_options()
        self._channel = (grpc.aio.secure_channel(self.options.target, creds, opts) if creds
                         else grpc.aio.insecure_channel(self.options.target, opts))
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)

    async def generate_stream(self, prompt: str | None = None, *,
                              timeout_s: float | None = None,
                              **request) -> AsyncIterator[StreamEvent]:
        message = build_request(prompt, **request)
        deadline = self.options.deadline(timeout_s)
        for attempt in range(self.options.max_retries + 1):
            call = self._stub.Generate(message, timeout=_remaining(deadline),
                                       metadata=self.options.metadata())
            received = False
            try:
                async for msg in call:
                    received = True
                    yield event_from_proto(msg)
                return
            except grpc.aio.AioRpcError as exc:
                if not self.options.should_retry(exc.code(), received, attempt, deadline):
                    raise GenerateError(exc.code(), exc.details()) from None
            finally:
                call.cancel()
            await asyncio.sleep(self.options.backoff_s(attempt))

    async def generate(self, prompt: str | None = None, *, timeout_s: float | None = None,
                       **request) -> GenerateResult:
        return GenerateResult.collect(
            [e async for e in self.generate_stream(prompt, timeout_s=timeout_s, **request)])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncKVClusterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
