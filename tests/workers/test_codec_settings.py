"""codec.level and codec.group_size reach both workers and the wire."""

from __future__ import annotations

import torch

from kvcluster.engine.dtypes import torch_dtype
from kvstore.codec.stream import unpack_stream
from tests.workers.conftest import running_workers, tiny_config
from tests.workers.test_disaggregated import _request


def test_codec_level_and_group_size_drive_the_transfer(tiny_model):
    config = tiny_config(tiny_model, codec={"level": "L3", "group_size": 5},
                         transfer={"policy": "adaptive", "slo_ms": 60_000})
    with running_workers(config) as (loop, prefill, decode, address):
        _, final, result = loop.run_until_complete(_request(prefill, decode, address, "c1"))
        levels, layout = prefill.senders.levels, prefill.node.layout
        # codec.level caps the adaptive choice (best_level "default") and is the probe.
        assert levels.best == "L3" and levels.default == "L3"
        assert decode.receiver.levels.default == "L3"
        kv = torch.randn(layout.shape(32)).to(torch_dtype(layout.dtype))
        codec = levels.codec("L3")
        assert unpack_stream(codec.encode(kv, layout), layout, codec.codec_id).group_size == 5
        assert decode.receiver.levels.codec("L3").group_size == 5
    assert result.transfer_ok and final.kv_source == "transfer"
    assert result.levels == ["L3", "L3"]
