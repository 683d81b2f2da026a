"""A tiny model and a small cluster config shared by the worker tests."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.engine.tiny import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-workers") / "llama")


def tiny_config(model_path, **overrides) -> ClusterConfig:
    """Block 4 tokens, store chunks of 16, transfer chunks of 32, small tiers."""
    data = {
        "model": {"path": str(model_path), "model_id": "tiny-llama", "device": "cpu",
                  "dtype": "float32"},  # exact parity with the fp32 references
        "engine": {"block_size": 4, "num_blocks": 256, "max_model_len": 512},
        "store": {"chunk_tokens": 16,
                  "device": {"capacity_bytes": 1 << 20},
                  "host": {"capacity_bytes": 4 << 20}},
        "transfer": {"chunk_tokens": 32, "policy": "lossless", "timeout_s": 20.0,
                     "chunk_timeout_s": 2.0},
        "workers": {"max_queue": 8, "max_local_prefill_tokens": 0},  # exercise the transfer
        "router": {"http_port": 0},  # never the fixed default: tests run side by side
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return from_dict(ClusterConfig, data)


@pytest.fixture
def config(tiny_model):
    return tiny_config(tiny_model)


@contextlib.contextmanager
def running_workers(config):
    """(loop, prefill, decode, decode address): one worker of each, no Ray; closed after."""
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker

    loop = asyncio.new_event_loop()
    decode = DecodeWorker(config, "decode-0")
    decode.engine.eos_ids = frozenset()  # random weights: never stop early
    prefill = PrefillWorker(config, "prefill-0")
    try:
        yield loop, prefill, decode, loop.run_until_complete(decode.start())
    finally:
        loop.run_until_complete(prefill.close())
        loop.run_until_complete(decode.close())
        loop.close()
