"""bench.serve's streaming client and schedules against a real kvcluster HTTP server."""

from __future__ import annotations

import asyncio

import openai

from bench.serve_client import ChatClient
from bench.serve_runner import Workload, run_workload
from bench.serve_workloads import Conversation, PromptFitter
from tests.server.http.conftest import MODEL

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Which colours does a traffic light show?"}]


def _chat(server, messages, max_tokens, model=MODEL):
    async def go():
        async with ChatClient(server.base_url, model) as client:
            return await client.chat(messages, max_tokens)
    return asyncio.run(go())


def _run(server, workload: Workload, fitter: PromptFitter):
    async def go():
        async with ChatClient(server.base_url, MODEL) as client:
            return await run_workload(client, workload, fitter)
    return asyncio.run(go())


def test_client_measures_a_stream_and_reads_usage_and_stage_ms(http_server, tokenizer):
    result = _chat(http_server, MESSAGES, 8)
    assert result.ok, result.error
    sdk = openai.OpenAI(base_url=http_server.base_url, api_key="x", max_retries=0)
    whole = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                        temperature=0)
    assert result.text == whole.choices[0].message.content  # greedy, streamed or not
    assert result.finish_reason == "length" and result.num_output_tokens == 8
    assert result.num_prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert 0 < result.ttft_ms <= result.latency_ms
    # one gap between successive content chunks; a chunk holds at least one token
    assert 1 <= len(result.gaps_ms) + 1 <= 8 and all(g >= 0 for g in result.gaps_ms)
    assert {"queue", "first_decode_step"} <= set(result.stage_ms)


def test_client_reports_cached_tokens_of_a_repeated_prompt(http_server):
    messages = [{"role": "user", "content": "The cache keeps this sentence around. " * 3}]
    first, again = _chat(http_server, messages, 2), _chat(http_server, messages, 2)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= again.num_prompt_tokens - 8  # whole 4-token blocks
    assert again.cached_fraction > 0.8


def test_client_records_http_errors_without_raising(http_server):
    result = _chat(http_server, MESSAGES, 4, model="no-such-model")
    assert not result.ok and result.error.startswith("HTTP 404")
    assert result.ttft_ms is None and result.num_output_tokens == 0


def _conversations(n: int, turns: int) -> tuple[Conversation, ...]:
    return tuple(Conversation(f"c{i}", "Be brief." if i % 2 else None,
                              tuple(f"Conversation {i}, question {t}?" for t in range(turns)),
                              (3,) * turns) for i in range(n))


def test_interleaved_schedule_goes_turn_by_turn_and_appends_own_answers(http_server, tokenizer):
    convs = _conversations(2, 2)
    run = _run(http_server, Workload("demo", convs, "interleaved"),
               PromptFitter(tokenizer, 512))
    assert [(r.conversation, r.turn) for r in run.results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(r.ok for r in run.results)
    first, second = run.results[0], run.results[2]
    history = [{"role": "user", "content": convs[0].user_turns[0]},
               {"role": "assistant", "content": first.text.strip()},
               {"role": "user", "content": convs[0].user_turns[1]}]
    assert second.num_prompt_tokens == len(tokenizer.encode_chat(history))
    assert second.num_cached_tokens > 0  # the first turn's prompt is a prefix of this one
    assert run.wall_s > 0


def test_closed_loop_and_poisson_keep_each_conversations_turns_in_order(http_server, tokenizer):
    fitter = PromptFitter(tokenizer, 512)
    for workload in (Workload("c4", _conversations(5, 3), "closed", concurrency=4),
                     Workload("poisson", _conversations(3, 2), "poisson", rate_per_s=50.0)):
        run = _run(http_server, workload, fitter)
        assert len(run.results) == workload.num_requests and all(r.ok for r in run.results)
        for index in range(len(workload.conversations)):
            mine = [r for r in run.results if r.conversation == index]
            assert [r.turn for r in mine] == list(range(len(mine)))
            assert all(a.sent_s < b.sent_s for a, b in zip(mine, mine[1:]))


def test_closed_loop_with_four_clients_overlaps_requests(http_server, tokenizer):
    run = _run(http_server, Workload("c4", _conversations(4, 1), "closed", concurrency=4),
               PromptFitter(tokenizer, 512))
    spans = sorted((r.sent_s, r.sent_s + r.latency_ms / 1e3) for r in run.results)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # sent before the other ended
