"""Backend failures reach the client as their gRPC status (any KVClusterError, through
kvcluster.server.status); bugs as INTERNAL without details; logs carry the request id."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import grpc
import pytest

from kvcluster.common import errors
from kvcluster.common.requests import FinalEvent, GenerateRequest, TokenEvent
from kvcluster.observability.logs import JsonFormatter
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from kvcluster.server.backend import GenerateBackend
from kvcluster.server.frontend import serve_frontend
from tests.frontend.conftest import make_config
from tests.frontend.helpers import call, status_of


class ScriptedBackend(GenerateBackend):
    """Streams two tokens, then does what the prompt's first token id says."""

    async def generate(self, request: GenerateRequest):
        yield TokenEvent((1,))
        yield TokenEvent((2,))
        action = request.prompt_token_ids[0]
        if action == 1:
            raise errors.UnavailableError("decode instance lost")
        if action == 2:
            raise RuntimeError("secret internal detail")
        if action == 3:
            return  # ends without the final event: a protocol violation
        if action == 4:
            raise errors.OverloadedError("decode worker decode-0 has 8 active requests")
        if action == 5:
            raise errors.InvalidRequestError("prompt too long for max_model_len=512")
        if action == 6:
            raise errors.KVClusterError("no such model", errors.NOT_FOUND)
        yield FinalEvent("length", 1.0, "p", "d", len(request.prompt_token_ids), 0, 2)

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(tokenizer):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # noqa: E731
    server, port = run(serve_frontend(ScriptedBackend(), tokenizer, make_config()))
    yield f"127.0.0.1:{port}"
    run(server.stop(None))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _request(action: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[action, 7]), max_new_tokens=4,
                              request_id=request_id)


@pytest.mark.parametrize("action, code, message", [
    (1, grpc.StatusCode.UNAVAILABLE, "decode instance lost"),
    (2, grpc.StatusCode.INTERNAL, "internal error (request id act-2)"),
    (3, grpc.StatusCode.INTERNAL, "backend ended the stream without a final event"),
    (4, grpc.StatusCode.RESOURCE_EXHAUSTED, "decode worker decode-0 has 8 active requests"),
    (5, grpc.StatusCode.INVALID_ARGUMENT, "prompt too long for max_model_len=512"),
    (6, grpc.StatusCode.NOT_FOUND, "no such model"),
])
def test_backend_failures_map_to_statuses(scripted, action, code, message):
    got_code, details = status_of(scripted, _request(action, f"act-{action}"))
    assert (got_code, details) == (code, message)
    assert "secret" not in details


def test_logs_are_json_lines_with_the_request_id(scripted):
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(JsonFormatter().format(record))
    logger = logging.getLogger("kvcluster.frontend")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        _, final = call(scripted, _request(0, "log-me"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert final.request_id == "log-me" and final.num_output_tokens == 2
    entries = [json.loads(line) for line in lines]
    mine = [e for e in entries if e.get("request_id") == "log-me"]
    assert any(e["msg"].startswith("generate tenant=") for e in mine)
    assert any(e["msg"].startswith("done finish=length") for e in mine)
