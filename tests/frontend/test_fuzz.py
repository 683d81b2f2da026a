"""Property-based fuzzing of the Generate front end over a real socket.

Random field values, random bytes and mutated valid messages: the server must
answer every call with OK or INVALID_ARGUMENT, never crash or hang, and keep
serving; an OK answer must respect the request's limits.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvcluster.common.requests import CHAT_ROLES, FinalEvent
from kvcluster.proto.convert_generate import event_from_proto
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from tests.frontend.conftest import ServerThread, limits, make_config

METHOD = "/kvcluster.v1.Generate/Generate"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
MAX_NEW = 6
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_target(tiny_dir, tokenizer):
    server = ServerThread(tiny_dir, tokenizer, make_config(
        limits=limits(max_prompt_tokens=120, max_new_tokens=MAX_NEW)))
    channel = grpc.insecure_channel(server.target)
    raw = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
    yield server, raw
    channel.close()
    server.stop()


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(CHAT_ROLES + ("", "root")),
                              content=st.text(max_size=40)), max_size=3)
sampling = st.builds(lambda kwargs: pb.SamplingParams(**kwargs), st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.floats(0, 2, width=32, allow_subnormal=False), floats),
    "top_p": st.one_of(st.floats(0.125, 1, width=32, allow_subnormal=False), floats),
    "top_k": st.integers(-5, 400), "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=3)}))
inputs = st.one_of(
    st.builds(dict, prompt=st.text(max_size=150)),
    st.builds(lambda m: {"chat": pb.ChatMessages(messages=m)}, messages),
    st.builds(lambda ids: {"prompt_token_ids": pb.TokenIds(ids=ids)},
              st.lists(st.integers(0, 400), max_size=140)),
    st.just({}))
requests = st.builds(
    lambda given_input, **fields: pb.GenerateRequest(**given_input, **fields),
    inputs, sampling=st.one_of(st.none(), sampling), max_new_tokens=st.integers(0, 10),
    tenant=st.text(max_size=8), slo_ms=st.one_of(st.just(0.0), st.floats(allow_nan=True)),
    request_id=st.one_of(st.just(""), st.text(max_size=8)))


def _answer(raw, data: bytes):
    """(status, decoded responses) of one raw call."""
    try:
        responses = [pb.GenerateResponse.FromString(r) for r in raw(data, timeout=30)]
    except grpc.RpcError as exc:
        return exc.code(), []
    return grpc.StatusCode.OK, responses


def _check_ok(responses, max_new_tokens: int | None) -> None:
    events = [event_from_proto(r) for r in responses]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.num_prompt_tokens > 0
    assert final.num_output_tokens <= (max_new_tokens or MAX_NEW) <= MAX_NEW


@FUZZ
@given(request=requests)
def test_random_field_values(fuzz_target, request):
    server, raw = fuzz_target
    code, responses = _answer(raw, request.SerializeToString())
    event(code.name)
    assert code in ALLOWED
    if code == grpc.StatusCode.OK:
        _check_ok(responses, request.max_new_tokens)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(fuzz_target, data):
    _, raw = fuzz_target
    code, responses = _answer(raw, data)
    event(code.name)
    assert code in ALLOWED
    if code == grpc.StatusCode.OK:
        _check_ok(responses, None)


VALID = pb.GenerateRequest(prompt="fuzz me", max_new_tokens=3,
                           sampling=pb.SamplingParams(temperature=0.5, seed=1, stop=["x"]),
                           tenant="t", request_id="r").SerializeToString()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.integers(0, len(VALID)))
def test_mutated_valid_messages(fuzz_target, flips, cut):
    _, raw = fuzz_target
    data = bytearray(VALID)
    for index, value in flips:
        data[index] = value
    code, responses = _answer(raw, bytes(data[:cut] if cut < 4 else data))
    event(code.name)
    assert code in ALLOWED
    if code == grpc.StatusCode.OK:
        _check_ok(responses, None)


def test_server_still_serves_after_fuzzing(fuzz_target):
    server, raw = fuzz_target
    code, responses = _answer(raw, VALID)
    assert code == grpc.StatusCode.OK and len(responses) >= 2
    server.wait_freed()
