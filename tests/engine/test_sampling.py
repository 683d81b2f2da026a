"""Greedy and seeded sampling, top-k / top-p filtering, stop conditions."""

from __future__ import annotations

import torch

from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.sampling import finish_reason, sample_token
from kvcluster.engine.sequence import Sequence
from tests.engine.conftest import make_runner, prompt


def _engine(tiny_dirs, **kwargs):
    return LLMEngine(make_runner(tiny_dirs["llama"], num_blocks=128), stop_on_eos=False, **kwargs)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_dirs):
    prompts = [prompt(6, seed=20), prompt(11, seed=21)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = _engine(tiny_dirs).generate(prompts, params)
    again = _engine(tiny_dirs).generate(prompts, params)
    assert first == again
    assert all(len(out) == 12 for out in first)
    other = _engine(tiny_dirs).generate(prompts, SamplingParams(12, 1.0, 0.9, seed=8))
    assert other != first


def test_sampled_tokens_do_not_depend_on_batch_neighbours(tiny_dirs):
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
    alone = _engine(tiny_dirs).generate([prompt(9, seed=22)], params)[0]
    crowd = [prompt(n, seed=30 + n) for n in (4, 13)]
    together = _engine(tiny_dirs).generate([prompt(9, seed=22)] + crowd, params)[0]
    assert alone == together


def test_top_k_one_equals_greedy(tiny_dirs):
    prompts = [prompt(8, seed=23), prompt(3, seed=24)]
    greedy = _engine(tiny_dirs).generate(prompts, SamplingParams(max_new_tokens=15))
    top1 = _engine(tiny_dirs).generate(
        prompts, SamplingParams(max_new_tokens=15, temperature=1.5, top_k=1, seed=1)
    )
    assert top1 == greedy


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([0.0, 3.0, 2.0, -1.0, 2.9])
    gen = torch.Generator().manual_seed(0)
    top2 = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert top2 == {1, 4}
    # probabilities ~ [.03, .41, .15, .01, .37]: top-p 0.5 keeps tokens 1 and 4
    top_p = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), gen)
             for _ in range(200)}
    assert top_p == {1, 4}
    tiny_p = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.01), gen)
              for _ in range(50)}
    assert tiny_p == {1}


def test_stop_token_and_max_new_tokens(tiny_dirs):
    engine = _engine(tiny_dirs)
    free_run = engine.generate([prompt(5, seed=25)], SamplingParams(max_new_tokens=10))[0]
    assert len(free_run) == 10
    stop_at = free_run[3]
    first_hit = free_run.index(stop_at)
    stopped = engine.generate(
        [prompt(5, seed=25)], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,))
    )[0]
    assert stopped == free_run[: first_hit + 1]


def test_ignore_eos_generates_past_end_of_sequence_but_stop_tokens_still_stop(tiny_dirs):
    engine = _engine(tiny_dirs)
    free_run = engine.generate([prompt(5, seed=26)], SamplingParams(max_new_tokens=10))[0]
    eos = free_run[3]
    engine.eos_ids = frozenset({eos})  # the tiny model's own EOS may never come up
    stopped = engine.generate([prompt(5, seed=26)], SamplingParams(max_new_tokens=10))[0]
    assert stopped == free_run[: free_run.index(eos) + 1]
    past = engine.generate([prompt(5, seed=26)],
                           SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert past == free_run
    stop_at = free_run[6]
    cut = engine.generate([prompt(5, seed=26)], SamplingParams(
        max_new_tokens=10, ignore_eos=True, stop_token_ids=(stop_at,)))[0]
    assert cut == free_run[: free_run.index(stop_at) + 1]


def test_finish_reason():
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_new_tokens=2), num_prompt_tokens=3)
    seq.append_token(9)
    assert finish_reason(seq, 100, frozenset({9})) == "stop"
    assert finish_reason(seq, 100, frozenset()) is None
    assert finish_reason(seq, 4, frozenset()) == "length"  # context full
    seq.append_token(5)
    assert finish_reason(seq, 100, frozenset()) == "length"  # max_new_tokens
