"""A prefill worker's start-up warm-up: the engine and every codec level run once, and
nothing of it stays behind (blocks, prefix registrations, size estimates, store)."""

from __future__ import annotations

import asyncio

import pytest

from prefill_worker.warm_up import filler_tokens, warm_up
from prefill_worker.worker import PrefillWorker
from tests.workers.conftest import tiny_config


@pytest.mark.parametrize("policy", ["lossless", "adaptive"])
def test_warm_up_runs_every_level_and_leaves_nothing_behind(tiny_model, policy):
    config = tiny_config(tiny_model, transfer={"policy": policy})
    worker = PrefillWorker(config, "prefill-warm")
    runner, levels = worker.node.runner, worker.senders.levels
    encoded = []
    for name in levels.names:
        codec = levels.codec(name)
        original = codec.encode
        codec.encode = lambda *a, _o=original, _n=name, **k: encoded.append(_n) or _o(*a, **k)
    free_before = runner.blocks.num_free
    try:
        asyncio.run(worker.start())
    finally:
        asyncio.run(worker.close())
    assert encoded == list(levels.names)  # each level once
    assert runner.blocks.num_free == free_before
    assert runner.blocks._block_of == {}  # no prefix registered for the filler
    assert all(levels.bytes_per_token(name) is None for name in levels.names)
    assert len(worker.node.store) == 0  # nothing stored (so no KV events either)


def test_filler_tokens_stay_in_the_vocabulary_and_vary():
    tokens = filler_tokens(300, 97)
    assert len(tokens) == 300 and all(0 <= t < 97 for t in tokens)
    assert len(set(tokens)) > 50 and all(a != b for a, b in zip(tokens, tokens[1:]))


def test_warm_up_takes_at_most_half_the_block_pool(tiny_model):
    config = tiny_config(tiny_model, engine={"num_blocks": 8})  # 32 tokens of KV
    worker = PrefillWorker(config, "prefill-small")
    try:
        assert warm_up(worker.node.runner, worker.senders.levels, 10_000) > 0
        assert worker.node.runner.blocks.num_free == 8
    finally:
        asyncio.run(worker.close())
