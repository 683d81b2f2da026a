"""The official ``openai`` SDK (sync, async, streaming) against the real HTTP API."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import openai
import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.sampling import SamplingParams
from tests.server.http.conftest import MODEL, MODEL_ALIAS

MESSAGES = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Which three colours does a traffic light show?"}]


def _chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL, temperature=0, **kwargs)


def test_chat_matches_the_grpc_api_and_counts_tokens(http_server, tokenizer):
    reply = _chat(http_server.client(), max_tokens=12)
    with KVClusterClient(f"127.0.0.1:{http_server.grpc_port}") as grpc_client:
        same = grpc_client.generate(messages=MESSAGES, params=SamplingParams(max_new_tokens=12))
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == same.text  # greedy: the same answer on either API
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    usage = reply.usage
    assert usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    assert isinstance(usage.prompt_tokens_details.cached_tokens, int)
    assert reply.kvcluster["decode_instance"] == "local-0"
    assert set(reply.kvcluster) == {"ttft_ms", "prefill_instance", "decode_instance", "stage_ms"}


def test_a_repeated_prompt_reports_its_cached_tokens(http_server):
    messages = [{"role": "user", "content": "Repeat after me: the cache remembers " * 3}]
    first = _chat(http_server.client(), messages=messages, max_tokens=2).usage
    again = _chat(http_server.client(), messages=messages, max_tokens=2).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    # every whole 4-token block of the prompt but the last is reused
    assert again.prompt_tokens_details.cached_tokens >= again.prompt_tokens - 8
    by_tier = again.prompt_tokens_details.cached_tokens_by_tier
    assert isinstance(by_tier, dict)
    if by_tier:
        assert sum(by_tier.values()) == again.prompt_tokens_details.cached_tokens


def test_stream_with_usage_carries_the_same_text(http_server):
    whole = _chat(http_server.client(), max_tokens=10)
    chunks = list(_chat(http_server.client(), max_tokens=10, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].kvcluster["decode_instance"] == "local-0"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage_sends_no_usage_chunk(http_server):
    chunks = list(_chat(http_server.client(), max_tokens=4, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_raw_stream_is_sse_ending_in_done(http_server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{http_server.base_url}/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_async_client_serves_concurrent_requests(http_server):
    async def run():
        async with http_server.async_client() as client:
            prompts = [f"Say the number {i} in words." for i in range(3)]
            replies = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=5,
                temperature=0) for p in prompts))
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[0]}], max_tokens=5,
                temperature=0, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            return replies, streamed

    replies, streamed = asyncio.run(run())
    assert [r.usage.completion_tokens for r in replies] == [5, 5, 5]
    assert streamed == replies[0].choices[0].message.content


def test_text_completion_from_text_and_from_token_ids(http_server, tokenizer):
    client = http_server.client()
    prompt = "Once upon a time"
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL_ALIAS, prompt=tokenizer.encode(prompt),
                                       max_tokens=6, temperature=0)
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_ids.model == MODEL_ALIAS
    assert by_text.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_text.choices[0].text


def test_text_completion_defaults_to_16_tokens(http_server):
    reply = http_server.client().completions.create(model=MODEL, prompt="Count:", temperature=0)
    assert reply.usage.completion_tokens == 16


def test_stop_string_cuts_the_text(http_server):
    client = http_server.client()
    kwargs = dict(model=MODEL, prompt="stop-string test", max_tokens=24, temperature=1.0,
                  seed=3)  # varied text from the tiny model
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert 0 < full.find(stop) < len(full) - 2, (full, stop)
    cut = client.completions.create(stop=[stop, "never-appears"], **kwargs)
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24
    one = client.completions.create(stop=stop, **kwargs)  # a bare string works too
    assert one.choices[0].text == cut.choices[0].text


def test_seeded_sampling_repeats_and_temperature_changes_it(http_server):
    client = http_server.client()
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.5, top_p=0.95)
    first = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    again = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    greedy = _chat(client, max_tokens=12).choices[0].message.content
    assert first == again
    assert first != greedy
    top_k = client.chat.completions.create(seed=7, extra_body={"top_k": 1}, **kwargs)
    assert top_k.choices[0].message.content == greedy  # top_k=1 is greedy


def test_cache_salt_separates_namespaces_within_a_tenant(http_server):
    prompt = "Salted: a prompt that is long enough to cache. " * 2

    def cached(salt):
        extra = {"cache_salt": salt} if salt else None
        reply = http_server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                                         extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached(None) == 0
    assert cached(None) > 0
    assert cached("salt-a") == 0  # not the unsalted namespace's blocks
    assert cached("salt-a") > 0
    assert cached("salt-b") == 0


def test_models_health_and_metrics(http_server):
    models = http_server.client().models.list()
    assert [m.id for m in models.data] == [MODEL, MODEL_ALIAS]
    assert models.data[0].owned_by == "kvcluster"
    health = httpx.get(f"{http_server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    before = http_server.count("OK")
    _chat(http_server.client(), max_tokens=1)
    metrics = httpx.get(f"{http_server.url}/metrics")
    assert metrics.status_code == 200
    assert 'kvcluster_frontend_requests_total{code="OK"}' in metrics.text
    assert http_server.count("OK") == before + 1
    assert "kvcluster_frontend_ttft_seconds_bucket" in metrics.text


def test_unknown_model_is_openai_not_found(http_server):
    with pytest.raises(openai.NotFoundError) as info:
        http_server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert _chat(http_server.client(), max_tokens=1).choices  # still serving
