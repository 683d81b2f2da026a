"""copy_kv: byte-exact chunk copies through the streaming-store path (large,
2-D in bytes) and the numpy fallback."""

import pytest
import torch

from kvcluster.common.layout import KVLayout
from kvstore import ChunkSpec
from kvstore.copy import NT_MIN_BYTES, _runs_2d, copy_kv
from kvstore.native.loader import load_nt_copy

BIG = ChunkSpec(KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16,
                         dtype="float16"), chunk_tokens=1024)  # 2 MiB a chunk


def test_big_chunk_is_over_the_streaming_threshold():
    assert BIG.chunk_bytes == 2 << 20 >= NT_MIN_BYTES


@pytest.mark.parametrize("native", [True, False])
def test_put_and_get_of_strided_chunks_are_exact(native, monkeypatch):
    if native and load_nt_copy() is None:
        pytest.skip("no C compiler / not x86-64: numpy path only")
    if not native:
        monkeypatch.setattr("kvstore.copy.load_nt_copy", lambda: None)
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(BIG.layout.shape(3 * BIG.chunk_tokens), generator=gen).half()
    pool = torch.zeros((3, BIG.chunk_bytes), dtype=torch.uint8)
    for i in range(3):  # chunk i of the token range: 8 runs of 256 KB -> one slot
        copy_kv(BIG.typed(pool[i]), BIG.tokens_view(kv, i))
    assert torch.equal(BIG.typed(pool[1]), BIG.tokens_view(kv, 1))
    out = torch.zeros_like(kv)
    for i in (2, 0, 1):
        copy_kv(BIG.tokens_view(out, i), BIG.typed(pool[i]))
    assert torch.equal(out, kv)


def test_streaming_copy_handles_unaligned_starts_and_tails():
    if load_nt_copy() is None:
        pytest.skip("no C compiler / not x86-64")
    n = NT_MIN_BYTES + 77
    src_buf = torch.randint(0, 256, (n + 16,), dtype=torch.uint8)
    dst_buf = torch.zeros(n + 16, dtype=torch.uint8)
    copy_kv(dst_buf[3 : 3 + n], src_buf[5 : 5 + n])  # misaligned both sides, odd length
    assert torch.equal(dst_buf[3 : 3 + n], src_buf[5 : 5 + n])
    assert dst_buf[:3].eq(0).all() and dst_buf[3 + n :].eq(0).all()  # nothing outside


def test_runs_2d_decomposition():
    kv = torch.zeros(BIG.layout.shape(3 * BIG.chunk_tokens), dtype=torch.float16)
    slot = torch.zeros(BIG.shape, dtype=torch.float16)
    run = BIG.chunk_tokens * 2 * 64 * 2  # tokens * H * D * 2 bytes
    assert _runs_2d(slot, BIG.tokens_view(kv, 1)) == (8, run, run, 3 * run)
    assert _runs_2d(slot, slot.clone()) == (1, BIG.chunk_bytes, BIG.chunk_bytes, BIG.chunk_bytes)
    assert _runs_2d(kv[..., :32], kv[..., 32:]) == (kv.numel() // 64, 64, 128, 128)
    big = torch.zeros((2, 5, 6))
    assert _runs_2d(torch.zeros((2, 3, 4)), big[:, :3, :4]) is None  # 3-D in bytes
    assert _runs_2d(big[:, :, ::2], big[:, :, 1::2]) is None  # inner stride 2
