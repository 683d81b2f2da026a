"""Small KV chunks for the codec tests: one with KV-like structure, one pure noise."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from kvcluster.common.config import EngineConfig
from kvcluster.common.layout import KVLayout
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.tiny import write_tiny_model

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, block_size=8, dtype="float16")
NUM_TOKENS = 37  # not a multiple of the anchor group: the tail group is exercised


def structured_kv(layout: KVLayout = LAYOUT, num_tokens: int = NUM_TOKENS, seed: int = 0):
    """Per-channel offsets, a slow drift along tokens, heavy-tailed noise, a small 'sink' token."""
    gen = torch.Generator().manual_seed(seed)
    shape = layout.shape(num_tokens)
    offsets = torch.randn(shape[0], 2, 1, *shape[3:], generator=gen) * 4
    drift = torch.randn(shape[0], 2, 1, *shape[3:], generator=gen) * torch.linspace(0, 1, num_tokens).view(1, 1, -1, 1, 1)
    noise = torch.randn(shape, generator=gen) * torch.rand(shape[0], 2, num_tokens, 1, 1, generator=gen)
    kv = offsets + drift + noise
    kv[:, :, 0] = 0.01 * torch.randn(shape[0], 2, *shape[3:], generator=gen)  # sink-like token
    return kv.to(torch.float16 if layout.dtype == "float16" else getattr(torch, layout.dtype))


def with_valid_crc(stream: bytes) -> bytes:
    """``stream`` with its header crc32 recomputed: a hand-made stream that passes the check."""
    if len(stream) < 32:
        return stream
    crc = zlib.crc32(stream[32:], zlib.crc32(stream[:28]))
    return stream[:28] + struct.pack("<I", crc) + stream[32:]


@pytest.fixture
def layout() -> KVLayout:
    return LAYOUT


@pytest.fixture
def kv() -> torch.Tensor:
    return structured_kv()


def tiny_runner(folder, num_blocks: int, max_model_len: int) -> ModelRunner:
    """A random-weight llama (written to ``folder``) in fp32, blocks of 8 tokens."""
    write_tiny_model(folder, arch="llama")
    config = EngineConfig(block_size=8, num_blocks=num_blocks, max_model_len=max_model_len)
    return ModelRunner.from_pretrained(folder, dtype="float32", engine_config=config)
