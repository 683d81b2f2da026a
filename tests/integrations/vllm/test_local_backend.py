"""The embedded backend with ``engine.kind: vllm`` (start_local_backend -> WorkerBackend
over a VLLMDecodeWorker in this process): stock vLLM's greedy tokens, the final event's
cached tokens, our error codes, an early close aborted inside vLLM. One engine for the
module (the Ray module's has stopped)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvcluster.common.errors import InvalidRequestError, OverloadedError
from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent
from kvcluster.common.sampling import SamplingParams
from kvcluster.server.local_backend import start_local_backend
from kvcluster.server.worker_backend import WorkerBackend
from tests.integrations.vllm.conftest import MAX_NEW_TOKENS, vllm_config


class _Loop:
    """An event loop thread the backend lives on (vLLM's client sockets are its)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def local(stock_outputs):
    loop = _Loop()
    backend = loop.run(start_local_backend(vllm_config()), 300)
    yield loop, backend
    loop.run(backend.close())
    loop.close()


async def _collect(backend, ids, request_id="r", max_new_tokens=MAX_NEW_TOKENS):
    request = GenerateRequest(request_id, "acme", tuple(ids),
                              SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    tokens, final = [], None
    async for event in backend.generate(request):
        if isinstance(event, TokenEvent):
            tokens.extend(event.token_ids)
        else:
            final = event
    return tokens, final


def test_vllm_kind_gets_the_worker_backend_with_stock_greedy_tokens(local, prompts,
                                                                   stock_outputs):
    loop, backend = local
    assert isinstance(backend, WorkerBackend)
    tokens, final = loop.run(_collect(backend, prompts["long"]))
    assert tokens == stock_outputs["long"]
    assert isinstance(final, FinalEvent) and final.decode_instance == "local-0"
    assert final.num_output_tokens == len(tokens) and final.num_cached_tokens == 0
    tokens, final = loop.run(_collect(backend, prompts["long"], "again"))
    assert tokens == stock_outputs["long"]
    assert final.cached_tokens_by_tier == {"prefix_cache": final.num_cached_tokens}
    assert final.num_cached_tokens > 0


def test_errors_keep_their_codes(local):
    loop, backend = local
    with pytest.raises(InvalidRequestError):
        loop.run(_collect(backend, [100] * 3000))
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        loop.run(_collect(backend, [10 ** 7, 5]))


def test_a_full_queue_refuses_and_an_early_close_aborts_in_vllm(local, prompts):
    loop, backend = local
    worker = backend.worker

    async def scenario():
        streams = [backend.generate(GenerateRequest(
            f"s{i}", "acme", tuple(prompts["short"]),
            SamplingParams(max_new_tokens=400, temperature=0.0))) for i in range(2)]
        for stream in streams:
            assert isinstance(await anext(stream), TokenEvent)
        with pytest.raises(OverloadedError):
            await _collect(backend, prompts["short"], "third")
        held = worker.engine.num_unfinished()
        for stream in streams:
            await stream.aclose()
        return held, worker.engine.num_unfinished()

    held, after_close = loop.run(scenario())
    assert (held, after_close) == (2, 0)
