"""Bad input over raw HTTP: OpenAI-shaped errors with the right status, and the server
keeps serving after each."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from kvcluster.server.status import openai_error_type
from tests.frontend.conftest import limits, make_config
from tests.server.http.conftest import MODEL

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GOOD_TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 1}


def post(server, body, path: str = "chat/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.base_url}/{path}", content=content, headers=headers,
                      timeout=30, **kwargs)


def assert_error(resp: httpx.Response, status: int, code: str, param=None, needle: str = ""):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param, error
    assert error["type"] == openai_error_type(code if code in _CODES else "NOT_FOUND")
    assert needle in error["message"], error["message"]


_CODES = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
          "DEADLINE_EXCEEDED", "INTERNAL")


def assert_serving(server, headers=None) -> None:
    resp = post(server, GOOD, headers=headers or {})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 1


def with_(**fields) -> dict:
    return {**GOOD, **fields}


CHAT_CASES = [
    (b"{not json", None, "not valid JSON"),
    (b'{"model": "tiny", "messages": [', None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'"text"', None, "must be a JSON object"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     "temperature", "finite"),
    ({"model": MODEL}, "messages", "Field required"),
    ({"messages": GOOD["messages"]}, "model", "Field required"),
    (with_(max_tokens="5"), "max_tokens", "valid integer"),
    (with_(max_tokens=2.5), "max_tokens", "valid integer"),
    (with_(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (with_(max_tokens=10**6), "max_tokens", "more than this server allows"),
    (with_(max_completion_tokens=10**6), "max_completion_tokens", "more than this server"),
    (with_(temperature=-1), "temperature", "greater than or equal to 0"),
    (with_(temperature="hot"), "temperature", "valid number"),
    (with_(top_p=0), "top_p", "greater than 0"),
    (with_(seed=-1), "seed", "greater than or equal to 0"),
    (with_(stream="yes"), "stream", "valid boolean"),
    (with_(stop=5), "stop", "none of its accepted forms"),
    (with_(stop=[""]), "stop", "at least 1 character"),
    (with_(stop=["x"] * 17), None, "at most 16 stop strings"),
    (with_(messages=[]), "messages", "at least 1"),
    (with_(messages="hi"), "messages", "valid list"),
    (with_(messages=[{"role": "robot", "content": "x"}]), "messages.0.role", "'user'"),
    (with_(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages.0.content", "none of its accepted forms"),
    (with_(n=2), "n", "n=2 is not supported"),
    (with_(logprobs=True), "logprobs", "not supported"),
    (with_(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "tool calling"),
    (with_(tool_choice="required"), "tool_choice", "not supported"),
    (with_(response_format={"type": "json_object"}), "response_format", "not supported"),
    (with_(presence_penalty=0.5), "presence_penalty", "not supported"),
    (with_(logit_bias={"5": 1.0}), "logit_bias", "not supported"),
    (with_(repetition_penalty=1.3), "repetition_penalty", "not supported"),
    (with_(cache_salt=""), "cache_salt", "at least 1 character"),
    (with_(cache_salt="a\nb"), "cache_salt", "printable"),
    (with_(timeout_s=0), "timeout_s", "greater than 0"),
]


@pytest.mark.parametrize("body, param, needle", CHAT_CASES)
def test_bad_chat_request_is_400_naming_the_parameter(http_server, body, param, needle):
    assert_error(post(http_server, body), 400, "INVALID_ARGUMENT", param, needle)
    assert_serving(http_server)


TEXT_CASES = [
    ({**GOOD_TEXT, "prompt": ["one", "two"]}, "prompt", "2 prompts in one request"),
    ({**GOOD_TEXT, "prompt": [1, 2, -1]}, "prompt", "greater than or equal to 0"),
    ({**GOOD_TEXT, "prompt": [1, 10**9]}, None, "outside the vocabulary"),
    ({**GOOD_TEXT, "prompt": ""}, None, "prompt is empty"),
    ({**GOOD_TEXT, "prompt": "word " * 500}, None, "the limit is 400"),
    ({**GOOD_TEXT, "prompt": [7] * 300, "max_tokens": 250}, "max_tokens", "context is 512 tokens"),
    ({**GOOD_TEXT, "echo": True}, "echo", "not supported"),
    ({**GOOD_TEXT, "best_of": 3}, "best_of", "not supported"),
    ({**GOOD_TEXT, "suffix": "end"}, "suffix", "not supported"),
    ({**GOOD_TEXT, "logprobs": 2}, "logprobs", "not supported"),
]


@pytest.mark.parametrize("body, param, needle", TEXT_CASES)
def test_bad_completion_request_is_400(http_server, body, param, needle):
    assert_error(post(http_server, body, "completions"), 400, "INVALID_ARGUMENT", param, needle)
    assert_serving(http_server)


def test_unknown_model_unknown_route_and_wrong_method(http_server):
    assert_error(post(http_server, with_(model="nope")), 404, "model_not_found", "model", "nope")
    resp = httpx.get(f"{http_server.base_url}/engines")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "NOT_FOUND"
    resp = httpx.get(f"{http_server.base_url}/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()
    assert_serving(http_server)


def test_without_max_tokens_a_chat_fills_the_context(http_server, tokenizer):
    messages = [{"role": "user", "content": "long " * 60}]
    resp = post(http_server, {"model": MODEL, "messages": messages, "temperature": 0})
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode_chat(messages)) > 512 - 256
    assert usage["completion_tokens"] == 512 - usage["prompt_tokens"]


def test_huge_bodies_are_413_before_and_while_reading(start_http):
    server = start_http(make_config(limits=limits(max_message_bytes=64 << 10)))
    huge = json.dumps(with_(messages=[{"role": "user", "content": "x" * (8 << 20)}])).encode()
    assert_error(post(server, huge), 413, "INVALID_ARGUMENT", None, "limit is 65536")

    def chunks():  # no Content-Length: counted while read
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)]

    resp = httpx.post(f"{server.base_url}/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"}, timeout=30)
    assert_error(resp, 413, "INVALID_ARGUMENT", None, "larger than the limit of 65536")
    assert_serving(server)


def test_overloaded_backend_is_429_streamed_or_not(start_http):
    server = start_http(max_queue=1, min_step_interval_s=0.05)
    busy = with_(max_tokens=200, stream=True)
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=busy) as holder:
        lines = holder.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)  # the one slot is taken
        for body in (GOOD, with_(stream=True)):
            assert_error(post(server, body), 429, "RESOURCE_EXHAUSTED", None, "overloaded")
    server.wait_freed()
    assert_serving(server)


def test_rate_limit_is_429_per_tenant_and_shared_with_grpc(start_http):
    from kvcluster.client import GenerateError, KVClusterClient
    from kvcluster.client.options import ClientOptions
    from kvcluster.common.config import SecurityConfig

    tokens = {"tok-a": "tenant-a", "tok-b": "tenant-b"}
    server = start_http(make_config(limits=limits(requests_per_s=0.01, burst=2),
                                    security=SecurityConfig(tokens=tokens)))
    as_a = {"authorization": "Bearer tok-a"}
    for _ in range(2):
        assert post(server, GOOD, headers=as_a).status_code == 200
    assert_error(post(server, GOOD, headers=as_a), 429, "RESOURCE_EXHAUSTED", None,
                 "over its rate limit")
    options = ClientOptions(target=f"127.0.0.1:{server.grpc_port}", token="tok-a", max_retries=0)
    with KVClusterClient(options=options) as client, pytest.raises(GenerateError) as info:
        client.generate("one bucket per tenant, whichever API")
    assert info.value.code.name == "RESOURCE_EXHAUSTED"
    assert_serving(server, headers={"authorization": "Bearer tok-b"})


def test_deadline_is_504_or_an_error_event_once_streaming(start_http):
    server = start_http(min_step_interval_s=0.05)
    assert_error(post(server, with_(max_tokens=100, timeout_s=0.3)), 504, "DEADLINE_EXCEEDED",
                 None, "deadline exceeded")
    server.wait_freed()
    body = with_(max_tokens=100, timeout_s=0.5, stream=True)
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "DEADLINE_EXCEEDED" and error["type"] == "timeout"
    server.wait_freed()
    assert_serving(server)


def test_no_backend_is_503(start_http):
    server = start_http()
    server.call(server.backend.close())
    assert_error(post(server, GOOD), 503, "UNAVAILABLE", None, "shut down")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "UNAVAILABLE"
