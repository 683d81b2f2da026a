"""The byte-exact export/import of block KV."""

from __future__ import annotations

import pytest
import torch

from kvcluster.common.layout import KVLayout
from kvcluster.engine.paged_cache import PagedKVCache

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_import_round_trip_is_byte_exact(dtype):
    layout = LAYOUT.with_dtype(dtype)
    cache = PagedKVCache(layout, num_blocks=6)
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=torch.Generator().manual_seed(0)))
    kv = cache.export_blocks([4, 1])
    assert kv.shape == layout.shape(8) == (3, 2, 8, 2, 8) and kv.is_contiguous()
    assert kv.numel() * kv.element_size() == layout.bytes_per_chunk(8)
    # layout byte order: token t of block 1 is row 4 + t
    assert torch.equal(kv[:, :, 4:8], cache.pool[:, :, 1])
    assert torch.equal(kv[:, :, 0:4], cache.pool[:, :, 4])
    other = PagedKVCache(layout, num_blocks=6)
    other.import_blocks([0, 5], kv)
    assert torch.equal(other.pool[:, :, 0], cache.pool[:, :, 4])
    assert torch.equal(other.pool[:, :, 5], cache.pool[:, :, 1])
    raw = lambda t: t.view(torch.uint8).numpy().tobytes()  # noqa: E731
    assert raw(other.export_blocks([0, 5])) == raw(kv)
    assert torch.count_nonzero(other.pool[:, :, 1:5]) == 0  # nothing else touched


def test_import_rejects_bad_shape_dtype_and_ids():
    cache = PagedKVCache(LAYOUT, num_blocks=4)
    good = torch.zeros(LAYOUT.shape(8))
    with pytest.raises(ValueError, match=r"shape \(3, 2, 4, 2, 8\), expected \(3, 2, 8, 2, 8\)"):
        cache.import_blocks([0, 1], torch.zeros(LAYOUT.shape(4)))
    with pytest.raises(ValueError, match="dtype torch.float16"):
        cache.import_blocks([0, 1], good.half())
    with pytest.raises(ValueError, match="repeated block ids"):
        cache.import_blocks([1, 1], good)
    with pytest.raises(ValueError, match="block id 9 out of range"):
        cache.import_blocks([0, 9], good)
