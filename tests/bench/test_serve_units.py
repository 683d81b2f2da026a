"""bench.serve's pure parts: prompt fitting, the ShareGPT builder, figures, configs."""

from __future__ import annotations

import json

import pytest

from bench.serve_client import RequestResult
from bench.serve_runner import Workload, WorkloadRun
from bench.serve_stats import overhead_ms, stage_p50, summarize
from bench.serve_systems import kvcluster_config
from bench.serve_vllm import _name_of, without_left_out
from bench.serve_workloads import (
    CONTEXT_MARGIN_TOKENS,
    PromptFitter,
    demo_conversations,
    sharegpt_conversations,
)
from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.demo_text import QUESTIONS, SYSTEM_PROMPT


def _history(num_exchanges: int, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "S " * 20}] if system else []
    for i in range(num_exchanges):
        messages += [{"role": "user", "content": f"question {i} " + "q " * 30},
                     {"role": "assistant", "content": f"answer {i} " + "a " * 30}]
    return messages + [{"role": "user", "content": "the new turn"}]


@pytest.mark.parametrize("system", [True, False])
def test_fitter_drops_the_oldest_exchanges_and_keeps_the_head(tokenizer, system):
    fitter = PromptFitter(tokenizer, 10_000)
    messages = _history(6, system)
    assert fitter.fit(messages, 16) == messages  # fits: untouched
    budget = len(tokenizer.encode_chat(messages)) // 2
    fitter = PromptFitter(tokenizer, budget + 16 + CONTEXT_MARGIN_TOKENS)
    fitted = fitter.fit(messages, 16)
    assert len(tokenizer.encode_chat(fitted)) <= budget
    head = messages[:1] if system else messages[:2]
    assert fitted[:len(head)] == head and fitted[-1] == messages[-1]
    kept = fitted[len(head):-1]
    assert kept == messages[len(messages) - 1 - len(kept):-1]  # the newest exchanges
    assert fitter.stats.exchanges_dropped == (len(messages) - len(fitted)) // 2
    assert fitter.stats.turns_cut == 0


def test_fitter_cuts_a_new_turn_longer_than_the_context(tokenizer):
    fitter = PromptFitter(tokenizer, 200)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "word " * 400}]
    fitted = fitter.fit(messages, 32)
    assert fitted[0] == messages[0]
    assert len(tokenizer.encode_chat(fitted)) <= 200 - 32 - CONTEXT_MARGIN_TOKENS
    assert fitted[1]["content"] and messages[1]["content"].startswith(fitted[1]["content"])
    assert fitter.stats.turns_cut == 1


def test_demo_conversations_are_the_demos():
    users = demo_conversations()
    assert [c.system for c in users] == [SYSTEM_PROMPT, SYSTEM_PROMPT]
    assert users[0].user_turns == tuple(QUESTIONS)
    assert all(t.endswith(q) and t != q for t, q in zip(users[1].user_turns, QUESTIONS))
    assert users[0].max_tokens == (32, 32, 32, 32)


def test_sharegpt_builder_skips_leading_gpt_turns_and_clamps_max_tokens(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    records = [
        {"id": "a", "conversations": [{"from": "gpt", "value": "hello, I am a bot"},
                                      {"from": "human", "value": "first question"},
                                      {"from": "gpt", "value": "x " * 200},
                                      {"from": "human", "value": "second question"},
                                      {"from": "gpt", "value": "ok"},
                                      {"from": "human", "value": "third"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "only one"},
                                      {"from": "gpt", "value": "fine then"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "nothing human"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "d1"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    convs = sharegpt_conversations(path, tokenizer, 0, 2, max_turns=2, max_tokens_cap=64)
    assert [c.name for c in convs] == ["sharegpt-a", "sharegpt-b"]
    assert convs[0].user_turns == ("first question", "second question")
    assert convs[0].system is None
    assert convs[0].max_tokens == (64, 8)  # 200+ answer tokens capped; "ok" raised to 8
    later = sharegpt_conversations(path, tokenizer, 2, 5, max_turns=2, max_tokens_cap=64)
    assert [c.name for c in later] == ["sharegpt-d"]  # "c" has no human turn
    with pytest.raises(FileNotFoundError):
        sharegpt_conversations(tmp_path / "absent.jsonl", tokenizer, 0, 1, 1, 8)


def _result(turn, ttft, cached, prompt=100, stages=None, gaps=(), out=4, ok=True):
    return RequestResult(0, turn, ok=ok, ttft_ms=ttft, gaps_ms=list(gaps),
                         num_prompt_tokens=prompt, num_cached_tokens=cached,
                         num_output_tokens=out, finish_reason="length" if ok else None,
                         stage_ms=dict(stages or {}), error="" if ok else "HTTP 500: x")


def test_overhead_is_ttft_minus_forward_passes_on_later_well_cached_turns():
    results = [
        _result(0, 500.0, 95, stages={"first_decode_step": 100.0}),   # first turn: excluded
        _result(1, 200.0, 95, stages={"first_decode_step": 30.0, "prefill": 50.0,
                                      "route": 1.0}),                 # 200 - 80
        _result(2, 90.0, 90, stages={"first_decode_step": 40.0}),      # 90 - 40
        _result(3, 300.0, 89, stages={"first_decode_step": 40.0}),     # < 90 % cached
        _result(4, 300.0, 99, stages={}),                              # no stage_ms (vLLM)
        _result(5, 300.0, 99, stages={"first_decode_step": 1.0}, ok=False),
    ]
    assert overhead_ms(results) == [120.0, 50.0]
    assert stage_p50(results[:3]) == {"first_decode_step": 40.0, "prefill": 50.0, "route": 1.0}


def test_summary_figures():
    results = [_result(0, 100.0, 0, gaps=(10.0, 30.0), out=3),
               _result(1, 300.0, 50, gaps=(20.0,), out=2),
               _result(2, 0.0, 0, ok=False)]
    s = summarize(WorkloadRun("w", results, wall_s=2.0))
    assert (s["requests"], s["errors"], s["first_error"]) == (3, 1, "HTTP 500: x")
    assert (s["ttft_p50_ms"], s["ttft_p99_ms"]) == (200.0, 298.0)
    assert s["later_turn_ttft_p50_ms"] == 300.0 and s["itl_p50_ms"] == 20.0
    assert s["output_tokens_per_s"] == 2.5 and s["cached_share"] == 0.25


def test_kvcluster_config_is_the_demos_sizes_on_loopback():
    from kvcluster.demo import demo_config

    for colocated in (False, True):
        config = from_dict(ClusterConfig, kvcluster_config(colocated, "/tmp/x", 8123))
        demo = demo_config("smollm2", "/tmp/x")
        assert config.engine == demo.engine and config.store == demo.store
        assert config.transfer == demo.transfer and config.model.dtype == "auto"
        assert config.workers.colocated is colocated
        assert (config.router.host, config.router.http_port) == ("127.0.0.1", 8123)



def test_vllm_engine_config_keeps_the_kv_cache_in_tokens_in_32_token_blocks():
    from kvcluster.demo import demo_config

    config = from_dict(ClusterConfig, kvcluster_config(True, "/tmp/x", 8123, "vllm"))
    demo = demo_config("smollm2", "/tmp/x").engine
    assert (config.engine.kind, config.engine.block_size) == ("vllm", 32)
    assert config.engine.num_blocks * 32 == demo.num_blocks * demo.block_size
    assert config.engine.max_model_len == demo.max_model_len and config.workers.colocated
    assert config.store == demo_config("smollm2", "/tmp/x", "vllm").store
    assert config.store.chunk_tokens == 32  # one vLLM block per store chunk
    small = from_dict(ClusterConfig, kvcluster_config(True, "/tmp/x", 8123, "vllm", 65))
    assert small.engine.num_blocks == 65 and small.engine.block_size == 32


def test_vllm_requirements_leave_out_the_wheels_built_for_another_torch():
    reqs = ["torchvision; platform_machine != 'riscv64'", "torchaudio", "torchcodec>=0.14",
            "torch==2.13.0+cpu; platform_machine == 'x86_64'", "transformers<5.20.0,>=5.16.1",
            "fastapi[standard]<0.137.0,>=0.133.0", "outlines_core==0.2.14"]
    kept = without_left_out(reqs)
    assert [_name_of(r) for r in kept] == ["torch", "transformers", "fastapi", "outlines-core"]


def test_workload_rejects_bad_schedules():
    with pytest.raises(ValueError, match="schedule"):
        Workload("x", (), "burst")
    with pytest.raises(ValueError, match="rate_per_s"):
        Workload("x", (), "poisson")
