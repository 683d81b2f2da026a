"""Chat and text completions on a :class:`GenerateBackend`, whole or streamed as SSE.

Per request, the same steps as the gRPC front end, in the same modules::

    model name served?            (404 model_not_found)
    parameters we can honour?     (400 naming the parameter: n, logprobs, tools, ...)
    tenant rate limit             (429; the limiter is shared with the gRPC front end)
    admit_prompt: chat template, tokenize, size checks          (400)
    text_events(backend, ...): first event awaited before answering, so an
        overloaded or unavailable backend still gets its status (429 / 503)
    whole answer, or SSE chunks then ``data: [DONE]``

An error after a stream has started cannot change the status any more: it is
sent as one ``data: {"error": ...}`` event before ``[DONE]``, as vLLM does.
Closing the stream (the client went away) closes the backend's generator,
which frees the request's KV.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvcluster.common import errors
from kvcluster.common.config import ClusterConfig
from kvcluster.common.requests import FinalEvent, TokenEvent
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.observability.logs import request_context
from kvcluster.observability.metrics import FrontendMetrics
from kvcluster.server.backend import GenerateBackend
from kvcluster.server.events import text_events
from kvcluster.server.frontend_input import ParsedRequest, admit_prompt
from kvcluster.server.http import translate
from kvcluster.server.http.errors import APIError, api_error_of, error_response
from kvcluster.server.http.request_models import ChatCompletionRequest, CompletionRequest
from kvcluster.server.http.response_models import ErrorBody, Usage
from kvcluster.server.http.shapes import DONE, ChatShape, CompletionShape, Shape, sse
from kvcluster.server.limits import TenantRateLimiter

log = logging.getLogger("kvcluster.http")
Body = ChatCompletionRequest | CompletionRequest


class OpenAIServing:
    def __init__(self, backend: GenerateBackend, tokenizer: Tokenizer, config: ClusterConfig,
                 model_names: list[str], metrics: FrontendMetrics,
                 rate_limiter: TenantRateLimiter):
        """
        Args:
            model_names: the names a request's ``model`` may use (the first is listed first).
        """
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config
        self.model_names = list(model_names)
        self.metrics = metrics
        self.rate_limiter = rate_limiter

    async def chat(self, body: ChatCompletionRequest, tenant: str, request_id: str) -> Response:
        return await self._answer(body, tenant, request_id, ChatShape)

    async def completion(self, body: CompletionRequest, tenant: str, request_id: str) -> Response:
        return await self._answer(body, tenant, request_id, CompletionShape)

    def count_cancelled(self) -> None:
        self.metrics.requests.labels(errors.CANCELLED).inc()

    # ------------------------------------------------------------------ private

    async def _answer(self, body: Body, tenant: str, request_id: str, shape_cls) -> Response:
        try:
            parsed = self._admit(body, tenant, request_id)
            with request_context(parsed.request.request_id):
                return await self._serve(body, parsed, shape_cls(parsed.request.request_id,
                                                                 body.model))
        except Exception as exc:  # noqa: BLE001 - every error gets OpenAI's shape
            error = api_error_of(exc, request_id)
            log.info("rejected (%s): %s", error.code, error.message)
            self.metrics.requests.labels(error.code).inc()
            return error_response(error)

    def _admit(self, body: Body, tenant: str, request_id: str) -> ParsedRequest:
        if body.model not in self.model_names:
            raise APIError(errors.NOT_FOUND, f"The model `{body.model}` does not exist "
                           f"(served: {', '.join(self.model_names)})", param="model",
                           error_code="model_not_found")
        problem = body.unsupported()
        if problem is not None:
            raise APIError(errors.INVALID_ARGUMENT, problem[1], param=problem[0])
        if body.ignored_fields():
            log.info("ignored request fields: %s", ", ".join(body.ignored_fields()))
        max_new_tokens, given = translate.max_new_tokens_of(body, self.config)
        self.rate_limiter.acquire(tenant)
        parsed = admit_prompt(
            translate.prompt_of(body), translate.sampling_of(body, max_new_tokens),
            body.stop_strings(), tenant=translate.cache_namespace(tenant, body.cache_salt),
            tokenizer=self.tokenizer, limits=self.config.limits, slo_ms=body.slo_ms,
            request_id=request_id, time_remaining_s=body.timeout_s)
        fitted = translate.check_fits_context(parsed.request.num_prompt_tokens, max_new_tokens,
                                              given, self.config.engine.max_model_len)
        params = dataclasses.replace(parsed.request.params, max_new_tokens=fitted)
        return dataclasses.replace(parsed, request=dataclasses.replace(parsed.request,
                                                                       params=params))

    async def _serve(self, body: Body, parsed: ParsedRequest, shape: Shape) -> Response:
        request = parsed.request
        log.info("%s tenant=%r prompt_tokens=%d max_new_tokens=%d stream=%s", type(body).__name__,
                 request.tenant, request.num_prompt_tokens, request.params.max_new_tokens,
                 body.stream)
        call = _Call(self.metrics, request.request_id, request.num_prompt_tokens)
        events = text_events(self.backend, self.tokenizer, parsed)
        try:
            first = await events.__anext__()  # admission in the backend: 429 / 503 here
        except BaseException:
            await _close(events)
            call.end(None)
            raise
        if not body.stream:
            return await self._whole(first, events, call, shape)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(self._stream(first, events, call, shape, include_usage))

    async def _whole(self, first, events, call: "_Call", shape: Shape) -> Response:
        pieces: list[str] = []
        final = None
        try:
            async for event in _chain(first, events):
                call.saw(event)
                if isinstance(event, FinalEvent):
                    final = event
                else:
                    pieces.append(event.text)
        except BaseException:  # cancelled (counted by the caller) or an error (answered)
            call.end(None)
            raise
        finally:
            await _close(events)
        call.end("OK", final)
        answer = shape.whole("".join(pieces), final, Usage.of(final, call.num_prompt_tokens))
        return JSONResponse(answer.model_dump(mode="json"))

    async def _stream(self, first, events, call: "_Call", shape: Shape,
                      include_usage: bool) -> AsyncIterator[bytes]:
        code = "OK"
        try:
            for chunk in shape.opening():
                yield chunk
            async for event in _chain(first, events):
                call.saw(event)
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield shape.delta(event.text)
                    continue
                yield shape.finish(event)
                if include_usage:
                    yield shape.usage(Usage.of(event, call.num_prompt_tokens))
                call.final = event
        except (asyncio.CancelledError, GeneratorExit):
            code = errors.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - the status is sent: report in the stream
            error = api_error_of(exc, call.request_id)
            code = error.code
            log.info("stream failed (%s): %s", error.code, error.message)
            yield sse(ErrorBody.model_validate(error.body()).model_dump_json())
        finally:  # counted first: in a cancelled scope every await raises again
            call.end(code, call.final)
            await _close(events)
        yield DONE


class _Call:
    """One request's metrics: in flight, its final code, TTFT and time per output token."""

    def __init__(self, metrics: FrontendMetrics, request_id: str, num_prompt_tokens: int):
        self.metrics = metrics
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.began = time.perf_counter()
        self.token_times: list[float] = []
        self.final: FinalEvent | None = None
        self._ended = False
        metrics.in_flight.inc()

    def saw(self, event) -> None:
        if isinstance(event, TokenEvent) and event.token_ids:
            self.token_times.extend([time.perf_counter()] * len(event.token_ids))

    def end(self, code: str | None, final: FinalEvent | None = None) -> None:
        """``code`` None: counted by whoever answers the error."""
        if self._ended:
            return
        self._ended = True
        self.metrics.in_flight.dec()
        if code is not None:
            self.metrics.requests.labels(code).inc()
        if final is not None:
            self.metrics.observe_stream(self.began, self.token_times, final)
            self.metrics.output_tokens.inc(len(self.token_times))
            log.info("done finish=%s ttft_ms=%.1f cached=%d/%d out=%d in %.3f s",
                     final.finish_reason, final.ttft_ms, final.num_cached_tokens,
                     final.num_prompt_tokens, final.num_output_tokens,
                     time.perf_counter() - self.began)


class _EventStream(StreamingResponse):
    """SSE whose generator is closed however the response ends (a client that went
    away included), so the backend's generator is closed and the KV freed now."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.body_iterator)


async def _chain(first, events):
    yield first
    async for event in events:
        yield event


async def _close(generator) -> None:
    """Close an async generator even while this task is being cancelled (the close
    must still reach the backend, whose generator frees the request)."""
    closing = asyncio.ensure_future(generator.aclose())
    closing.add_done_callback(_log_close_failure)
    try:
        await asyncio.shield(closing)  # cancelled meanwhile: the close still runs to its end
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - logged by the callback; the answer is already decided
        pass


def _log_close_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a stream failed: %r", task.exception())
