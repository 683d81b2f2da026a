"""The client SDK against a real gRPC Generate server on 127.0.0.1.

The server here is a small stand-in that follows the Generate contract
(tokens, then one final message; auth; honouring cancellation): the client is
what is under test.
"""

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from kvcluster.client import (AsyncKVClusterClient, ChatMessage, ClientOptions, FinalEvent,
                              GenerateError, KVClusterClient, TokenEvent, build_request)
from kvcluster.common.requests import FinalEvent as Final
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.convert_generate import event_to_proto, prompt_from_proto, sampling_from_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2_grpc


class StandInServicer(generate_pb2_grpc.GenerateServicer):
    """Streams the prompt's ids (text: code points) back, one token per message."""

    def __init__(self, token: str = "", delay_s: float = 0.0, fail_after: int | None = None):
        self.token = token
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.requests, self.cancelled, self.metadata = [], [], []

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.token and self.metadata[-1].get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        prompt = prompt_from_proto(request)
        params = sampling_from_proto(request)
        ids = list(prompt.token_ids or [ord(c) for c in prompt.text or
                                        "".join(m.content for m in prompt.messages)])
        state = {"finished": False}
        done = threading.Event()
        context.add_callback(lambda: (done.set(), state["finished"]
                                      or self.cancelled.append(request.request_id)))
        for i in range(params.max_new_tokens):
            if self.fail_after is not None and i == self.fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "instance lost")
            yield event_to_proto(TokenEvent((ids[i % len(ids)],), chr(ids[i % len(ids)])))
            if self.delay_s and done.wait(self.delay_s):
                return
        state["finished"] = True
        yield event_to_proto(Final("length", 1.5, "p0", "d0", len(ids), 0,
                                   params.max_new_tokens, request.request_id))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(servicer, port: int = 0, creds=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generate_pb2_grpc.add_GenerateServicer_to_server(servicer, server)
    address = f"127.0.0.1:{port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    server.start()
    return server, port


@pytest.fixture
def server():
    servicer = StandInServicer()
    srv, port = _serve(servicer)
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


def _wait_for(pred, timeout_s=5.0) -> bool:
    deadline = time.time() + timeout_s
    while not pred() and time.time() < deadline:
        time.sleep(0.01)
    return pred()


def test_build_request_takes_exactly_one_input():
    msg = build_request(messages=[{"role": "user", "content": "hi"}, ChatMessage("system", "s")],
                        params=SamplingParams(max_new_tokens=3, seed=5), tenant="t",
                        slo_ms=200, request_id="r")
    assert msg.WhichOneof("input") == "chat" and msg.chat.messages[1].role == "system"
    assert (msg.max_new_tokens, msg.sampling.seed, msg.tenant, msg.slo_ms) == (3, 5, "t", 200)
    assert build_request(token_ids=[1, 2]).prompt_token_ids.ids == [1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        build_request("text", token_ids=[1])


def test_sync_stream_and_collect(server):
    servicer, target = server
    with KVClusterClient(target) as client:
        events = list(client.generate_stream("abc", params=SamplingParams(max_new_tokens=4),
                                             request_id="s1"))
        result = client.generate(token_ids=[104, 105], params=SamplingParams(max_new_tokens=3))
    assert [e.token_ids for e in events[:-1]] == [(97,), (98,), (99,), (97,)]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.request_id == "s1"
    assert (final.num_output_tokens, final.ttft_ms, final.decode_instance) == (4, 1.5, "d0")
    assert (result.text, result.token_ids) == ("hih", [104, 105, 104])


def test_async_stream(server):
    servicer, target = server

    async def run():
        async with AsyncKVClusterClient(target) as client:
            events = [e async for e in client.generate_stream(
                messages=[ChatMessage("user", "xy")], params=SamplingParams(max_new_tokens=2))]
            result = await client.generate("q", params=SamplingParams(max_new_tokens=1))
            return events, result

    events, result = asyncio.run(run())
    assert [e.text for e in events[:-1]] == ["x", "y"] and isinstance(events[-1], FinalEvent)
    assert result.text == "q"


def test_deadline_ends_the_call_and_the_server_sees_it():
    servicer = StandInServicer(delay_s=0.05)
    srv, port = _serve(servicer)
    try:
        with KVClusterClient(f"127.0.0.1:{port}") as client, pytest.raises(GenerateError) as err:
            client.generate("slow", params=SamplingParams(max_new_tokens=200), timeout_s=0.3,
                            request_id="d1")
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_for(lambda: "d1" in servicer.cancelled)
        assert len(servicer.requests) == 1                      # no retry on a deadline
    finally:
        srv.stop(0)


def test_breaking_out_of_a_stream_cancels_it():
    servicer = StandInServicer(delay_s=0.05)
    srv, port = _serve(servicer)
    try:
        with KVClusterClient(f"127.0.0.1:{port}") as client:
            stream = client.generate_stream("long", params=SamplingParams(max_new_tokens=200),
                                            request_id="c1")
            assert next(stream).token_ids == (ord("l"),)
            stream.close()
            assert _wait_for(lambda: "c1" in servicer.cancelled)
    finally:
        srv.stop(0)


def test_bearer_token_is_sent_and_auth_errors_are_not_retried():
    servicer = StandInServicer(token="s3cret")
    srv, port = _serve(servicer)
    target = f"127.0.0.1:{port}"
    try:
        with KVClusterClient(target) as anon, pytest.raises(GenerateError) as err:
            anon.generate("x")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and len(servicer.requests) == 1
        with KVClusterClient(options=ClientOptions(target=target, token="s3cret")) as client:
            assert client.generate("ok", params=SamplingParams(max_new_tokens=2)).text == "ok"
        assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"
    finally:
        srv.stop(0)


def test_retries_unavailable_until_the_server_is_up():
    port = _free_port()
    servicer = StandInServicer()
    started = {}
    timer = threading.Timer(0.5, lambda: started.setdefault("srv", _serve(servicer, port)[0]))
    timer.start()
    opts = ClientOptions(target=f"127.0.0.1:{port}", max_retries=10, backoff_initial_s=0.05,
                         backoff_max_s=0.2)
    try:
        with KVClusterClient(options=opts) as client:
            result = client.generate("up", params=SamplingParams(max_new_tokens=2), timeout_s=10)
        assert result.text == "up" and len(servicer.requests) == 1
    finally:
        timer.join()
        started["srv"].stop(0)
    with KVClusterClient(options=ClientOptions(target=f"127.0.0.1:{_free_port()}",
                                               max_retries=0)) as client:
        with pytest.raises(GenerateError) as err:
            client.generate("x", timeout_s=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_no_retry_once_tokens_arrived():
    servicer = StandInServicer(fail_after=2)
    srv, port = _serve(servicer)
    try:
        with KVClusterClient(f"127.0.0.1:{port}") as client:
            got = []
            with pytest.raises(GenerateError) as err:
                for event in client.generate_stream("abcd", params=SamplingParams(max_new_tokens=5)):
                    got.append(event)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "instance lost" in err.value.details
        assert len(got) == 2 and len(servicer.requests) == 1
    finally:
        srv.stop(0)


def test_tls_with_a_private_ca(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    srv, port = _serve(StandInServicer(), creds=creds)
    try:
        opts = ClientOptions(target=f"localhost:{port}", tls=True, root_cert=str(cert))
        with KVClusterClient(options=opts) as client:
            assert client.generate("tls", params=SamplingParams(max_new_tokens=3)).text == "tls"
        plain = ClientOptions(target=f"127.0.0.1:{port}", max_retries=0)
        with KVClusterClient(options=plain) as client, pytest.raises(GenerateError):
            client.generate("x", timeout_s=2)
    finally:
        srv.stop(0)
