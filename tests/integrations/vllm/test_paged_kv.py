"""PagedKV on both paged layouts vLLM hands a connector: whole blocks in and out, in
kvcluster's ``[L, 2, T, H, D]`` order."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from kvcluster.integrations.vllm.paged_kv import CPU_LAYOUT, FLASH_LAYOUT, PagedKV, PagedShape

SHAPE = PagedShape(num_kv_heads=2, head_dim=4, block_size=8)
NUM_BLOCKS, NUM_LAYERS = 6, 3


def caches(kind: str) -> dict[str, torch.Tensor]:
    B, H, D = SHAPE.block_size, SHAPE.num_kv_heads, SHAPE.head_dim
    dims = (NUM_BLOCKS, H, B, 2 * D) if kind == CPU_LAYOUT else (2, NUM_BLOCKS, B, H, D)
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(dims) for i in range(NUM_LAYERS)}


@pytest.mark.parametrize("kind", [CPU_LAYOUT, FLASH_LAYOUT])
def test_scattered_blocks_come_back_in_token_order(kind):
    tensors = caches(kind)
    paged = PagedKV.from_kv_caches(tensors, SHAPE)
    assert paged.kind == kind and paged.num_blocks == NUM_BLOCKS
    kv = torch.randn(NUM_LAYERS, 2, 2 * SHAPE.block_size, SHAPE.num_kv_heads, SHAPE.head_dim)
    paged.scatter([4, 1], kv)
    assert torch.equal(paged.gather([4, 1]), kv)
    assert torch.equal(paged.gather([1]), kv[:, :, SHAPE.block_size:])
    # the second block's first token, key of head 1 in layer 2, where vLLM reads it
    layer2 = tensors["model.layers.2.self_attn.attn"]
    where = (layer2[1, 1, 0, : SHAPE.head_dim] if kind == CPU_LAYOUT else layer2[0, 1, 0, 1])
    assert torch.equal(where, kv[2, 0, SHAPE.block_size, 1])
    assert not paged.gather([0, 2, 3, 5]).any()  # nothing else was written


def test_out_of_range_blocks_and_wrong_shapes_are_refused():
    paged = PagedKV.from_kv_caches(caches(CPU_LAYOUT), SHAPE)
    kv = torch.zeros(NUM_LAYERS, 2, SHAPE.block_size, SHAPE.num_kv_heads, SHAPE.head_dim)
    with pytest.raises(ValueError, match="out of range"):
        paged.scatter([NUM_BLOCKS], kv)
    with pytest.raises(ValueError, match="expected"):
        paged.scatter([0, 1], kv)
    with pytest.raises(ValueError, match="unsupported vLLM KV cache tensor"):
        PagedKV.from_kv_caches({"model.layers.0.attn": torch.zeros(4, 4)}, SHAPE)
