"""End to end over real gRPC on 127.0.0.1: tiny engine KV -> codec -> wire -> paged blocks."""

from __future__ import annotations

import pytest
import torch

from kvcluster.transfer.messages import TEXT_LEVEL, StreamCode
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


def test_lossless_stream_is_bit_exact_and_split_into_messages(
        sender_runner, receiver_runner, layout, levels):
    tokens = prompt(70, seed=1)  # 5 chunks of 16 tokens, the last one partial (6 tokens)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config()

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            async with KVSender(node.server.address, levels, config,
                                policy=make_policy(levels.best, levels.names)) as sender:
                source = ChunkSource(tokens, layout, levels, config.chunk_tokens, kv=kv)
                result = await sender.send(source, "r1")
                received = await node.receiver.wait_result("r1", 5)
                info = await sender.receiver_info()  # updated from the final status
                return result, received, node.kv("r1"), source, info

    result, received, got, source, info = run(main())
    assert dict(info.decode_tokens_per_s)[levels.best] > 0
    assert result.error == "" and result.status.code == StreamCode.OK
    assert result.levels == [levels.best] * 5
    assert received.stats.levels == {i: levels.best for i in range(5)}
    assert received.status.num_chunks_decoded == 5
    assert torch.equal(got, kv)
    # 16 tokens * bytes_per_token > message_payload_bytes: every full chunk took several messages
    assert layout.bytes_per_chunk(16) > config.message_payload_bytes
    assert result.bytes_sent == sum(len(source.payload(i, levels.best)) for i in range(5))


def test_text_chunks_are_recomputed_with_the_receivers_prefill(
        sender_runner, receiver_runner, layout, levels):
    tokens = prompt(48, seed=2)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config()

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            async with KVSender(node.server.address, levels, config,
                                policy=make_policy("recompute", levels.names)) as sender:
                source = ChunkSource(tokens, layout, levels, config.chunk_tokens, kv=kv)
                result = await sender.send(source, "r2")
                received = await node.receiver.wait_result("r2", 5)
                info = await sender.receiver_info(refresh=True)
                return result, received, node.kv("r2"), info

    result, received, got, info = run(main())
    assert result.levels == [TEXT_LEVEL] * 3 and result.bytes_sent == 0
    assert result.status.code == StreamCode.RECOMPUTED
    assert result.status.num_chunks_recomputed == 3
    torch.testing.assert_close(got, kv, rtol=1e-4, atol=1e-4)
    assert info.prefill_tokens_per_s > 0  # measured by those recomputes


def test_messages_above_the_receivers_maximum_are_refused(sender_runner, receiver_runner,
                                                          layout, levels):
    tokens = prompt(400, seed=4)
    kv = prefill_kv(sender_runner, tokens)
    # Inline payloads (a data plane would carry the chunk beside the stream's limit).
    receiver_config = small_config(max_message_bytes=96 << 10, message_payload_bytes=16 << 10,
                                   data_plane="grpc")
    sender_config = small_config(chunk_tokens=400, message_payload_bytes=1 << 20,
                                 max_message_bytes=2 << 20, data_plane="grpc")

    async def main():
        async with receiver_node(receiver_runner, levels, receiver_config) as node:
            async with KVSender(node.server.address, levels, sender_config,
                                policy=make_policy(levels.best, levels.names)) as sender:
                source = ChunkSource(tokens, layout, levels, 400, kv=kv)
                assert len(source.payload(0, levels.best)) > 96 << 10
                return await sender.send(source, "big")

    result = run(main())
    assert result.status is None
    assert result.error.startswith("RESOURCE_EXHAUSTED"), result.error
