"""store.chunk_tokens is the one tokens-per-hash setting: workers announce it, routers check it."""

from __future__ import annotations

import dataclasses

import torch

from kvcluster.common.events import HashSettings
from kvcluster.common.hashing import ExtraKeys
from kvcluster.engine.dtypes import torch_dtype
from kvcluster.worker.node import WorkerNode, build_runner, hash_settings
from router import ViewState, build_router
from tests.workers.conftest import tiny_config

PROMPT = list(range(10, 60))  # 3 chunks of 16 (+ 2 tokens)


def test_router_matches_a_node_of_its_chunk_size_and_refuses_another(tiny_model):
    config = tiny_config(tiny_model)                 # block 4, store chunks of 16
    runner = build_runner(config)
    model_id = runner.model_id
    router = build_router(config, hash_settings(model_id, 4, config.store.chunk_tokens))
    other = dataclasses.replace(config, store=dataclasses.replace(config.store, chunk_tokens=32))
    node = WorkerNode(config, "p-16", "prefill", runner, router.bus)
    wrong = WorkerNode(other, "p-32", "prefill", runner, router.bus)
    try:
        assert node.settings == HashSettings(model_id, 4, 16)
        assert wrong.settings.tokens_per_hash == 32
        for n in (node, wrong):
            router.registry.register(n.instance_id)
            keys = n.chunk_keys(PROMPT, "")
            layout = n.layout
            kv = torch.zeros(layout.shape(len(keys) * n.chunk_tokens),
                             dtype=torch_dtype(layout.dtype))
            n.save_chunks(keys, kv, "")
            n.publisher.flush()
        while router.pump_events():
            pass
        views = router.status()
        assert views["p-16"].state is ViewState.OK
        assert views["p-32"].state is ViewState.HASH_MISMATCH
        assert "tokens_per_hash 32 vs 16" in views["p-32"].reason
        decision = router.route(router.request_for(PROMPT, ExtraKeys(model_id)))
        assert (decision.instance_id, decision.matched_tokens) == ("p-16", 48)
        assert "p-32" in decision.excluded
    finally:
        node.close()
        wrong.close()
