"""The demo's summary says which engine served it and what carried the KV."""

from __future__ import annotations

from rich.console import Console

from kvcluster.common.config import ClusterConfig, EngineConfig, ModelConfig
from kvcluster.common.tasks import PrefillResult
from kvcluster.demo import Turn, _serving, _summary_table


def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_summary_names_the_engine_and_counts_transfers_by_data_plane():
    turns = [Turn(0, t, 100.0 + t, 90.0, 1.0, 500, 480 if t else 0, {}, 32, "ok")
             for t in range(4)]
    results = [PrefillResult("a", 500, 384, data_plane="shm", wire_bytes=1 << 20,
                             raw_bytes=4 << 20, levels=["L2"]),
               PrefillResult("b", 520, 512, data_plane="shm"),
               PrefillResult("c", 530, 0)]  # nothing sent
    serving = _serving(ClusterConfig(model=ModelConfig(dtype="float32", device="cpu")))
    assert serving == "native (kvcluster's torch engine), float32 on cpu"
    text = _render(_summary_table(turns, results, 2.0, serving))
    assert "native (kvcluster's torch engine), float32 on cpu" in text
    assert "3 of 4" in text
    assert "shm: 2" in text


def test_serving_names_the_vllm_engine():
    config = ClusterConfig(model=ModelConfig(dtype="bfloat16", device="cpu"),
                           engine=EngineConfig(kind="vllm", block_size=32))
    assert _serving(config) == "vLLM (kvcluster's KV connector), bfloat16 on cpu"
