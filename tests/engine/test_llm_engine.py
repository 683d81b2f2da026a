"""Continuous batching, in-process prefix reuse and preemption in LLMEngine."""

from __future__ import annotations

import pytest

from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import make_runner, prompt

GREEDY = SamplingParams(max_new_tokens=8)


def _reference(tiny_dirs, token_ids, max_new_tokens=8):
    """Greedy tokens from the bare runner, one request alone."""
    runner = make_runner(tiny_dirs["llama"])
    seq = Sequence("ref", token_ids)
    logits = runner.prefill(seq)
    for _ in range(max_new_tokens - 1):
        seq.append_token(int(logits.argmax()))
        logits = runner.decode_step([seq])[0]
    seq.append_token(int(logits.argmax()))
    return seq.output_ids


def _engine(tiny_dirs, **kwargs):
    return LLMEngine(make_runner(tiny_dirs["llama"], **kwargs), stop_on_eos=False)


def test_batched_generate_equals_each_request_alone(tiny_dirs):
    prompts = [prompt(n, seed=40 + n) for n in (3, 10, 17, 6)]
    outputs = _engine(tiny_dirs).generate(prompts, GREEDY)
    assert outputs == [_reference(tiny_dirs, p) for p in prompts]


def test_requests_join_a_running_batch(tiny_dirs):
    engine = _engine(tiny_dirs)
    first, second = prompt(5, seed=50), prompt(12, seed=51)
    engine.add_request("a", first, GREEDY)
    steps = [engine.step(), engine.step(), engine.step()]
    assert [[o.request_id for o in s] for s in steps] == [["a"], ["a"], ["a"]]
    engine.add_request("b", second, GREEDY)
    assert [o.request_id for o in engine.step()] == ["b"]  # prefill step
    assert [o.request_id for o in engine.step()] == ["a", "b"]  # one decode batch
    while engine.has_unfinished():
        engine.step()
    assert engine.pop("a").output_ids == _reference(tiny_dirs, first)
    assert engine.pop("b").output_ids == _reference(tiny_dirs, second)


def test_shared_prefix_blocks_are_reused(tiny_dirs):
    engine = _engine(tiny_dirs)
    blocks = engine.runner.blocks
    system = prompt(13, seed=60)  # 3 full blocks of 4 + 1 token
    a, b = system + prompt(6, seed=61), system + prompt(3, seed=62)
    engine.add_request("a", a, GREEDY)
    engine.step()
    seq_a = engine.sequences["a"]
    assert seq_a.num_cached_tokens == 0
    engine.add_request("b", b, GREEDY)
    engine.step()
    seq_b = engine.sequences["b"]
    assert seq_b.num_cached_tokens == 12
    assert seq_b.block_table[:3] == seq_a.block_table[:3]
    assert [blocks.ref_count(i) for i in seq_a.block_table[:4]] == [2, 2, 2, 1]
    while engine.has_unfinished():
        engine.step()
    assert engine.pop("b").output_ids == _reference(tiny_dirs, b)
    # finished requests' blocks stay cached in the free list: a repeat hits them
    engine.add_request("c", a, GREEDY)
    engine.step()
    assert engine.sequences["c"].num_cached_tokens == 16  # all full blocks but the last token's
    assert blocks.num_free + len(engine.sequences["c"].block_table) == 64


def test_prefix_cache_is_keyed_by_tenant(tiny_dirs):
    tokens = prompt(12, seed=63)
    plain = _engine(tiny_dirs)
    plain.generate([tokens], GREEDY)
    plain.add_request("again", tokens, GREEDY)
    plain.step()
    assert plain.sequences["again"].num_cached_tokens == 8
    salted = LLMEngine(plain.runner, stop_on_eos=False, tenant_salt="tenant-b")
    salted.add_request("other", tokens, GREEDY)
    salted.step()
    assert salted.sequences["other"].num_cached_tokens == 0


def test_per_request_tenant_salt(tiny_dirs):
    tokens = prompt(12, seed=68)
    engine = _engine(tiny_dirs)
    engine.add_request("a1", tokens, GREEDY, tenant_salt="tenant-a")
    engine.step()
    engine.add_request("a2", tokens, GREEDY, tenant_salt="tenant-a")
    engine.add_request("b1", tokens, GREEDY, tenant_salt="tenant-b")
    engine.add_request("default", tokens, GREEDY)
    engine.step()
    cached = {rid: engine.sequences[rid].num_cached_tokens for rid in ("a2", "b1", "default")}
    assert cached == {"a2": 8, "b1": 0, "default": 0}


def test_abort_frees_blocks_wherever_the_request_is(tiny_dirs):
    engine = _engine(tiny_dirs)
    blocks = engine.runner.blocks
    engine.add_request("running", prompt(9, seed=65), GREEDY)
    engine.step()
    cached = blocks.allocate(2)
    engine.add_request("waiting", prompt(10, seed=66), GREEDY, cached_blocks=cached)
    assert engine.abort("running") and engine.abort("waiting")
    assert not engine.abort("never-added")
    assert blocks.num_free == 64 and not engine.has_unfinished() and not engine.sequences
    tokens = prompt(5, seed=67)
    assert engine.generate([tokens], GREEDY) == [_reference(tiny_dirs, tokens)]


def test_cached_blocks_from_outside_are_used(tiny_dirs):
    tokens = prompt(14, seed=64)
    donor = _engine(tiny_dirs)
    donor.add_request("d", tokens, GREEDY)
    donor.step()
    kv = donor.runner.cache.export_blocks(donor.sequences["d"].block_table[:2])
    engine = _engine(tiny_dirs)
    blocks = engine.runner.blocks.allocate(2)
    engine.runner.cache.import_blocks(blocks, kv)
    seq = engine.add_request("x", tokens, GREEDY, cached_blocks=blocks)
    while engine.has_unfinished():
        engine.step()
    assert seq.num_cached_tokens == 8
    assert seq.output_ids == _reference(tiny_dirs, tokens)


def test_preemption_when_the_pool_runs_dry_keeps_outputs_exact(tiny_dirs):
    prompts = [prompt(7, seed=70 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=12)
    engine = _engine(tiny_dirs, num_blocks=12)  # 48 slots < 3 * (7 + 12)
    outputs = engine.generate(prompts, params)
    assert engine.num_preemptions > 0
    assert outputs == [_reference(tiny_dirs, p, 12) for p in prompts]
    assert engine.runner.blocks.num_free == 12


def test_add_request_rejects_oversized_prompt_and_duplicate_id(tiny_dirs):
    engine = _engine(tiny_dirs, max_model_len=16)
    engine.add_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [4])
    with pytest.raises(ValueError, match="17 tokens exceed"):
        engine.add_request("b", list(range(17)))
