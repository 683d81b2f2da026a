"""Blocking client: stream a generation, or collect it."""

from __future__ import annotations

import time
from typing import Iterator

import grpc

from kvcluster.client.options import ClientOptions
from kvcluster.client.request import build_request
from kvcluster.client.result import GenerateResult
from kvcluster.common.requests import StreamEvent
from kvcluster.proto.convert_generate import event_from_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2_grpc


class GenerateError(RuntimeError):
    """A call failed; ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details or ""


class KVClusterClient:
    """Blocking Generate client; see :mod:`kvcluster.client` for examples."""

    def __init__(self, target: str | None = None, options: ClientOptions | None = None):
        self.options = (options or ClientOptions()).with_target(target)
        creds = self.options.credentials()
        opts = self.options.channel_options()
        self._channel = (grpc.secure_channel(self.options.target, creds, opts) if creds
                         else grpc.insecure_channel(self.options.target, opts))
        self._stub = generate_pb2_grpc.GenerateStub(self._channel)

    def generate_stream(self, prompt: str | None = None, *, timeout_s: float | None = None,
                        **request) -> Iterator[StreamEvent]:
        """Yield TokenEvents, then one FinalEvent.

        Args:
            prompt, messages=, token_ids=, params=, stop=, tenant=, slo_ms=, request_id=:
                see :func:`kvcluster.client.request.build_request`.
            timeout_s: deadline of the whole call, retries included
                (default ``options.timeout_s``).

        Retries with backoff on UNAVAILABLE until the first response arrives.
        Stopping the iteration early (break, ``close()``) cancels the call, which
        frees the request on the server.
        """
        message = build_request(prompt, **request)
        deadline = self.options.deadline(timeout_s)
        for attempt in range(self.options.max_retries + 1):
            call = self._stub.Generate(message, timeout=_remaining(deadline),
                                       metadata=self.options.metadata())
            received = False
            try:
                for msg in call:
                    received = True
                    yield event_from_proto(msg)
                return
            except grpc.RpcError as exc:
                if not self.options.should_retry(exc.code(), received, attempt, deadline):
                    raise GenerateError(exc.code(), exc.details()) from None
            finally:
                call.cancel()  # no-op once finished
            time.sleep(self.options.backoff_s(attempt))

    def generate(self, prompt: str | None = None, *, timeout_s: float | None = None,
                 **request) -> GenerateResult:
        """The whole answer: text, token ids and the final message."""
        return GenerateResult.collect(self.generate_stream(prompt, timeout_s=timeout_s, **request))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "KVClusterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())
