"""A decode worker's request errors carry their status code (no Ray: the worker itself)."""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.worker import DecodeWorker
from kvcluster.common.errors import INVALID_ARGUMENT, InvalidRequestError
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import DecodeTask
from tests.workers.conftest import tiny_config

STORED = tuple((5 * i + 1) % 300 + 10 for i in range(300))  # fits max_model_len=512
TOO_LONG = STORED + tuple((3 * i + 2) % 300 + 10 for i in range(300))  # 600 > 512


def test_prompt_too_long_is_invalid_request_and_frees_its_loaded_blocks(tiny_model):
    """The stored prefix is loaded into paged blocks before the engine refuses the
    prompt; those blocks go back to the pool with the error."""
    decode = DecodeWorker(tiny_config(tiny_model), "decode-e")
    decode.engine.eos_ids = frozenset()
    blocks = decode.node.runner.blocks
    loop = asyncio.new_event_loop()

    async def run(request_id, prompt):
        task = DecodeTask(request_id, prompt, SamplingParams(max_new_tokens=2))
        return [step async for step in decode.generate(task)]

    try:
        steps = loop.run_until_complete(run("stored", STORED))  # its chunks reach the store
        assert steps[-1].kv_source == "none" and steps[-1].finish_reason == "length"
        assert blocks.num_free == blocks.num_blocks
        keys = decode.node.chunk_keys(TOO_LONG[:-1], "")
        assert decode.node.store.lookup(keys).num_chunks == len(STORED) // 16
        with pytest.raises(InvalidRequestError, match="max_model_len=512") as info:
            loop.run_until_complete(run("too-long", TOO_LONG))
        assert info.value.code == INVALID_ARGUMENT
        assert blocks.num_free == blocks.num_blocks  # the loaded prefix was given back
        assert not decode.engine.has_unfinished()
    finally:
        loop.run_until_complete(decode.close())
        loop.close()
