"""Round trips between generate_pb2 messages and our request/event types."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.common.requests import (
    CHAT_ROLES,
    ChatMessage,
    FinalEvent,
    GenerateRequest,
    TokenEvent,
)
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto import convert_generate as convert
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb

f32 = st.floats(0.125, 4.0, width=32, allow_subnormal=False)  # exact in float32 (the wire type)
params_st = st.builds(
    SamplingParams, max_new_tokens=st.integers(1, 4096),
    temperature=st.one_of(st.just(0.0), f32), top_p=st.one_of(st.just(1.0), st.floats(
        0.125, 1.0, width=32, allow_subnormal=False)),
    top_k=st.integers(0, 1000), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4).map(tuple),
    ignore_eos=st.booleans())
prompts = st.one_of(
    st.builds(convert.PromptInput, text=st.text(max_size=30)),
    st.builds(convert.PromptInput, messages=st.lists(st.builds(
        ChatMessage, role=st.sampled_from(CHAT_ROLES), content=st.text(max_size=20)),
        max_size=3).map(tuple)),
    st.builds(convert.PromptInput, token_ids=st.lists(st.integers(0, 2**32 - 1),
                                                      max_size=20).map(tuple)))
text = st.text(max_size=12)


@settings(max_examples=150, deadline=None)
@given(prompt=prompts, params=params_st, stop=st.lists(st.text(min_size=1, max_size=5),
                                                       max_size=3), tenant=text,
       slo_ms=st.floats(0, 1e6, allow_subnormal=False), request_id=text)
def test_request_round_trip(prompt, params, stop, tenant, slo_ms, request_id):
    msg = convert.request_to_proto(prompt, params, stop=stop, tenant=tenant, slo_ms=slo_ms,
                                   request_id=request_id)
    wire = pb.GenerateRequest.FromString(msg.SerializeToString())
    assert convert.prompt_from_proto(wire) == prompt
    assert convert.sampling_from_proto(wire) == params
    assert convert.stop_strings_from_proto(wire) == tuple(stop)
    assert (wire.tenant, wire.slo_ms, wire.request_id) == (tenant, slo_ms, request_id)


@given(event=st.one_of(
    st.builds(TokenEvent, token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=5).map(tuple),
              text=text),
    st.builds(FinalEvent, finish_reason=st.sampled_from(["stop", "length"]),
              ttft_ms=st.floats(0, 1e9, allow_subnormal=False), prefill_instance=text,
              decode_instance=text, num_prompt_tokens=st.integers(0, 2**32 - 1),
              num_cached_tokens=st.integers(0, 2**32 - 1),
              num_output_tokens=st.integers(0, 2**32 - 1), request_id=text,
              cached_tokens_by_tier=st.dictionaries(text, st.integers(0, 2**32 - 1), max_size=4),
              stage_ms=st.dictionaries(text, st.floats(0, 1e9, allow_subnormal=False),
                                       max_size=7))))
def test_event_round_trip(event):
    wire = pb.GenerateResponse.FromString(convert.event_to_proto(event).SerializeToString())
    assert convert.event_from_proto(wire) == event


def test_unset_sampling_fields_take_the_documented_defaults():
    params = convert.sampling_from_proto(pb.GenerateRequest(prompt="x"), default_max_new_tokens=9)
    assert params == SamplingParams(max_new_tokens=9, temperature=0.0, top_p=1.0, top_k=0)


@pytest.mark.parametrize("sampling, field", [
    (pb.SamplingParams(top_p=0.0), "top_p"), (pb.SamplingParams(top_p=float("nan")), "top_p"),
    (pb.SamplingParams(temperature=float("inf")), "temperature"),
    (pb.SamplingParams(temperature=-0.5), "temperature"), (pb.SamplingParams(top_k=-1), "top_k"),
])
def test_bad_sampling_values_raise_value_error_naming_the_field(sampling, field):
    with pytest.raises(ValueError, match=field):
        convert.sampling_from_proto(pb.GenerateRequest(prompt="x", sampling=sampling))


def test_request_types_validate():
    with pytest.raises(ValueError, match="exactly one"):
        convert.PromptInput(text="a", token_ids=(1,))
    with pytest.raises(ValueError, match="empty prompt"):
        GenerateRequest("r", "t", ())
    with pytest.raises(ValueError, match="chat role"):
        ChatMessage("admin", "x")
    with pytest.raises(ValueError, match="no input"):
        convert.prompt_from_proto(pb.GenerateRequest())
    assert GenerateRequest("r", "t", [1, 2]).prompt_token_ids == (1, 2)


def test_router_side_imports_no_torch():
    code = ("import sys; import kvcluster.server.frontend, kvcluster.server.backend, kvcluster.proto.convert_generate;"
            " import kvcluster.client; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
