"""Generate over real gRPC: streaming, final info, prefix reuse, health, reflection, limits."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvcluster.client import AsyncKVClusterClient, GenerateError, KVClusterClient
from kvcluster.common.sampling import SamplingParams
from kvcluster.proto.kvcluster.v1 import generate_pb2 as pb
from tests.frontend.conftest import BLOCK_SIZE, limits, make_config
from tests.frontend.helpers import call, status_of, text, token_ids

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens


def test_stream_tokens_then_final_with_prefix_reuse(shared_server, tokenizer):
    request = pb.GenerateRequest(prompt=LONG_PROMPT, max_new_tokens=12, tenant="t-reuse")
    events, final = call(shared_server.target, request)
    num_prompt = len(tokenizer.encode(LONG_PROMPT))
    assert len(token_ids(events)) == 12 == final.num_output_tokens
    assert text(events) == tokenizer.decode(token_ids(events))
    assert final.finish_reason == "length"
    assert final.num_prompt_tokens == num_prompt
    assert final.num_cached_tokens == 0
    assert final.prefill_instance == final.decode_instance == "local-0"
    assert final.ttft_ms > 0 and final.request_id

    again_events, again = call(shared_server.target, request)
    # every full block but the one holding the last prompt token is reused
    assert again.num_cached_tokens == (num_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE > 0
    assert again.cached_tokens_by_tier == {"prefix_cache": again.num_cached_tokens}
    assert token_ids(again_events) == token_ids(events)  # greedy: same tokens
    # the engine's own clock splits TTFT: its queue, then the step computing the tail
    assert set(again.stage_ms) == {"queue", "first_decode_step"}
    assert 0 < again.stage_ms["first_decode_step"] <= again.ttft_ms


def test_chat_messages_use_the_chat_template(shared_server, tokenizer):
    messages = [pb.ChatMessage(role="system", content="Be brief."),
                pb.ChatMessage(role="user", content="Hi")]
    request = pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), max_new_tokens=3,
                                 request_id="chat-1")
    _, final = call(shared_server.target, request)
    expected = tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}])
    assert final.num_prompt_tokens == len(expected)
    assert final.request_id == "chat-1"


def test_token_id_prompt_and_seeded_sampling_repeat(shared_server):
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6, 7, 8, 9]),
                                 max_new_tokens=8,
                                 sampling=pb.SamplingParams(temperature=1.0, top_k=50, seed=7))
    first, _ = call(shared_server.target, request)
    second, _ = call(shared_server.target, request)
    assert token_ids(first) == token_ids(second)
    assert all(0 <= t < 320 for t in token_ids(first))


def test_stop_string_ends_text_before_it(shared_server):
    sampling = pb.SamplingParams(temperature=1.0, seed=3)  # varied text from the tiny model
    base = pb.GenerateRequest(prompt="stop-string test", max_new_tokens=24, sampling=sampling)
    events, _ = call(shared_server.target, base)
    full = text(events)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert 0 < full.find(stop) < len(full) - 2, (full, stop)
    request = pb.GenerateRequest()
    request.CopyFrom(base)
    request.sampling.stop.append(stop)
    cut_events, final = call(shared_server.target, request)
    assert text(cut_events) == full[: full.find(stop)]
    assert final.finish_reason == "stop"
    assert final.num_output_tokens == len(token_ids(cut_events)) < 24
    assert token_ids(cut_events) == token_ids(events)[: final.num_output_tokens]
    shared_server.wait_freed()


def test_sync_client_streams_and_collects(shared_server, tokenizer):
    with KVClusterClient(shared_server.target) as client:
        events = list(client.generate_stream("hello", params=SamplingParams(max_new_tokens=5)))
        result = client.generate(messages=[{"role": "user", "content": "hello"}],
                                 params=SamplingParams(max_new_tokens=4))
    assert len(events) >= 6 and events[-1].num_output_tokens == 5
    assert len(result.token_ids) == 4 == result.final.num_output_tokens
    assert result.text == tokenizer.decode(result.token_ids)


def test_async_client_streams_concurrently(shared_server):
    async def main():
        async with AsyncKVClusterClient(shared_server.target) as client:
            results = await asyncio.gather(*[
                client.generate(f"prompt number {i}", params=SamplingParams(max_new_tokens=6))
                for i in range(4)])
            chunks = [e async for e in client.generate_stream(
                "stream me", params=SamplingParams(max_new_tokens=3))]
        return results, chunks

    results, chunks = asyncio.run(main())
    assert [len(r.token_ids) for r in results] == [6, 6, 6, 6]
    assert chunks[-1].finish_reason == "length" and len(chunks) >= 4


def test_health_is_serving_and_follows_the_backend(start_server):
    server = start_server(health_interval_s=0.05)
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvcluster.v1.Generate"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.call(server.backend.close())
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(shared_server):
    with grpc.insecure_channel(shared_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"kvcluster.v1.Generate", "grpc.health.v1.Health"} <= names
        file_request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="kvcluster.v1.Generate")
        reply = next(stub.ServerReflectionInfo(iter([file_request]), timeout=5))
        assert reply.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(prompt="x" * 401), "401 tokens; the limit is 400"),
    (dict(prompt=""), "prompt is empty"),
    (dict(), "no input"),
    (dict(chat=pb.ChatMessages()), "no messages"),
    (dict(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="root", content="x")])),
     "chat role"),
    (dict(prompt="hi", max_new_tokens=257), "max_new_tokens=257"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-1.0)), "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)), "temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_k=-3)), "top_k"),
    (dict(prompt="hi", sampling=pb.SamplingParams(stop=[""])), "stop"),
    (dict(prompt_token_ids=pb.TokenIds(ids=[1, 320])), "outside the vocabulary"),
    (dict(prompt="hi", slo_ms=-1.0), "slo_ms"),
    (dict(prompt="hi", request_id="bad\nid"), "request_id"),
])
def test_bad_requests_are_invalid_argument(shared_server, request_kwargs, message):
    code, details = status_of(shared_server.target, pb.GenerateRequest(**request_kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_prompt_longer_than_the_model_context_is_invalid_argument(start_server):
    config = make_config(limits=limits(max_prompt_tokens=4096))
    server = start_server(config)
    code, details = status_of(server.target, pb.GenerateRequest(prompt="y" * 600))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in details
    server.wait_freed()


def test_oversized_message_is_refused(start_server):
    server = start_server(make_config(limits=limits(max_message_bytes=1024)))
    code, details = status_of(server.target, pb.GenerateRequest(prompt="z" * 4000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details


def test_rate_limit_per_tenant_is_resource_exhausted(start_server):
    server = start_server(make_config(limits=limits(requests_per_s=0.01, burst=2)))
    request = pb.GenerateRequest(prompt="rate", max_new_tokens=1, tenant="a")
    for _ in range(2):
        call(server.target, request)
    code, details = status_of(server.target, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
    other = pb.GenerateRequest(prompt="rate", max_new_tokens=1, tenant="b")
    assert call(server.target, other)[1].num_output_tokens == 1  # buckets are per tenant


def test_overload_is_resource_exhausted(start_server):
    server = start_server(max_queue=1, min_step_interval_s=0.02)
    with grpc.insecure_channel(server.target) as channel:
        from kvcluster.proto.kvcluster.v1 import generate_pb2_grpc as pb_grpc

        stub = pb_grpc.GenerateStub(channel)
        busy = stub.Generate(pb.GenerateRequest(prompt="long one", max_new_tokens=200),
                             timeout=30)
        next(busy)  # admitted and streaming
        code, details = status_of(server.target, pb.GenerateRequest(prompt="x", max_new_tokens=1))
        busy.cancel()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in details
    server.wait_freed()


def test_client_error_carries_the_status(shared_server):
    with KVClusterClient(shared_server.target) as client:
        with pytest.raises(GenerateError) as info:
            client.generate("")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_match_the_engine_run_offline(shared_server, tiny_dir):
    from kvcluster.engine.llm_engine import LLMEngine
    from kvcluster.engine.runner import ModelRunner

    prompt_ids = [11, 22, 33, 44, 55, 66, 77, 88, 99]
    runner = ModelRunner.from_pretrained(tiny_dir, engine_config=make_config().engine)
    expected = LLMEngine(runner, stop_on_eos=False).generate(
        [prompt_ids], SamplingParams(max_new_tokens=10, temperature=0.8, seed=5))[0]
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt_ids), max_new_tokens=10,
                                 sampling=pb.SamplingParams(temperature=0.8, seed=5))
    events, _ = call(shared_server.target, request)
    assert token_ids(events) == expected
