"""Shared fixtures for the transfer tests: the tiny model, its layout, codec levels."""

from __future__ import annotations

import pytest
import torch
import uvloop

from kvcluster.common.config import EngineConfig, TransferConfig
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.engine.tiny import write_tiny_model
from kvcluster.transfer.levels import LevelSet
from kvstore.codec.factory import level_set

BLOCK_SIZE = 4


def run(coro):
    """Run a coroutine on uvloop (what the servers use)."""
    return uvloop.run(coro)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def make_runner(path, num_blocks: int = 256) -> ModelRunner:
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, max_model_len=512)
    return ModelRunner.from_pretrained(path, engine_config=config)


@pytest.fixture(scope="session")
def sender_runner(tiny_dir):
    return make_runner(tiny_dir)


@pytest.fixture(scope="session")
def layout(sender_runner):
    return sender_runner.layout


@pytest.fixture(scope="session")
def levels():
    """Every codec level (best first) from the codec factory, with its baselines."""
    return load_levels()


def load_levels() -> LevelSet:
    return level_set()


def prompt(length: int, seed: int, vocab: int = 320) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def prefill_kv(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """The KV the sender holds after prefill: ``[L, 2, T, H, D]``."""
    seq = Sequence("src", token_ids)
    with torch.inference_mode():
        runner.prefill(seq)
    kv = runner.cache.export_blocks(seq.block_table)[:, :, :len(token_ids)].clone()
    runner.free(seq)
    return kv


def small_config(**overrides) -> TransferConfig:
    base = dict(chunk_tokens=16, message_payload_bytes=4096, max_message_bytes=1 << 20,
                num_channels=2, chunk_timeout_s=2.0, timeout_s=20.0, slo_ms=5000.0)
    base.update(overrides)
    return TransferConfig(**base)
