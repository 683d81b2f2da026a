"""A tiny model and a small cluster config shared by the worker tests."""

from __future__ import annotations

import pytest

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.engine.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-workers") / "llama")


def tiny_config(model_path, **overrides) -> ClusterConfig:
    """Block 4 tokens, store chunks of 16, transfer chunks of 32, small tiers."""
    data = {
        "model": {"path": str(model_path), "model_id": "tiny-llama", "device": "cpu"},
        "engine": {"block_size": 4, "num_blocks": 256, "max_model_len": 512},
        "store": {"chunk_tokens": 16,
                  "device": {"capacity_bytes": 1 << 20},
                  "host": {"capacity_bytes": 4 << 20}},
        "transfer": {"chunk_tokens": 32, "policy": "lossless", "timeout_s": 20.0,
                     "chunk_timeout_s": 2.0},
        "workers": {"max_queue": 8},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return from_dict(ClusterConfig, data)


@pytest.fixture
def config(tiny_model):
    return tiny_config(tiny_model)
