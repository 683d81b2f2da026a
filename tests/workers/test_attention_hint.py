"""codec.attention_hint: the prefill worker measures attention and the encoder uses it."""

from __future__ import annotations

import pytest
import torch

from kvcluster.engine.dtypes import torch_dtype
from kvcluster.transfer.source import ChunkSource
from kvstore.codec.factory import level_set
from kvstore.codec.hint import EncodeHint
from tests.workers.conftest import running_workers, tiny_config
from tests.workers.test_disaggregated import _request


def _send_once(config):
    with running_workers(config) as (loop, prefill, decode, address):
        return loop.run_until_complete(_request(prefill, decode, address, "r1"))


def test_hinted_transfer_is_coded_differently_and_still_decodes(tiny_model):
    runs = {}
    for hint in (False, True):
        config = tiny_config(tiny_model, transfer={"policy": "L0"},
                             codec={"attention_hint": hint})
        runs[hint] = _send_once(config)
    for tokens, final, result in runs.values():
        assert result.transfer_ok and result.levels == ["L0", "L0"]
        assert final.kv_source == "transfer" and len(tokens) == 8
    # The measured importance moved the steps: the streams differ in size.
    assert runs[True][2].wire_bytes != runs[False][2].wire_bytes


def test_chunk_source_hands_each_chunk_its_hint_and_checks_their_number(tiny_model):
    from kvcluster.worker.node import build_runner

    runner = build_runner(tiny_config(tiny_model))
    kv = torch.randn(runner.layout.shape(64)).to(torch_dtype(runner.layout.dtype))
    levels = level_set(["L0"])
    plain = ChunkSource(range(64), runner.layout, levels, 32, kv=kv)
    weights = torch.ones(runner.layout.num_layers, 32)
    weights[:, :16] = 50.0  # half the tokens matter far more: coded finer, more bytes
    hints = [EncodeHint(weights, first_chunk=True, last_chunk=False),
             EncodeHint(torch.ones(runner.layout.num_layers, 32), False, True)]
    hinted = ChunkSource(range(64), runner.layout, levels, 32, kv=kv, hints=hints)
    assert hinted.payload(0, "L0") != plain.payload(0, "L0")
    with pytest.raises(ValueError, match="1 hints for 2 chunks"):
        ChunkSource(range(64), runner.layout, levels, 32, kv=kv, hints=hints[:1])
