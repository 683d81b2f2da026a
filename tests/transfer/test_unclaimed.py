"""Received KV that no request claims gives its paged blocks back (no leak)."""

from __future__ import annotations

import asyncio

import pytest

from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


async def _send(node, levels, layout, config, tokens, kv, request_id):
    async with KVSender(node.server.address, levels, config,
                        policy=make_policy(levels.best, levels.names)) as sender:
        source = ChunkSource(tokens, layout, levels, config.chunk_tokens, kv=kv)
        return await sender.send(source, request_id)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def test_unclaimed_result_is_discarded_after_its_ttl(
        sender_runner, receiver_runner, layout, levels):
    tokens = prompt(40, seed=5)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(unclaimed_result_s=0.3)
    free = receiver_runner.blocks

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            before = free.num_free
            result = await _send(node, levels, layout, config, tokens, kv, "orphan")
            assert result.status.ok
            held = before - free.num_free
            await _until(lambda: node.receiver.num_unclaimed == 0)
            await _until(lambda: free.num_free == before)
            return held

    assert run(main()) == -(-40 // layout.block_size)  # held, then all freed


def test_claimed_result_keeps_its_blocks_past_the_ttl(
        sender_runner, receiver_runner, layout, levels):
    tokens = prompt(40, seed=6)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(unclaimed_result_s=0.2)
    free = receiver_runner.blocks

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            before = free.num_free
            claim = asyncio.ensure_future(node.receiver.wait_result("mine", 5))
            await _send(node, levels, layout, config, tokens, kv, "mine")
            received = await claim
            await asyncio.sleep(0.5)
            held = before - free.num_free
            node.free("mine")
            return received, held

    received, held = run(main())
    assert received.status.ok and held == -(-40 // layout.block_size)


def test_result_given_up_on_is_discarded_when_it_arrives(
        sender_runner, receiver_runner, layout, levels):
    tokens = prompt(40, seed=7)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(unclaimed_result_s=60.0)
    free = receiver_runner.blocks

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            before = free.num_free
            with pytest.raises(asyncio.TimeoutError):
                await node.receiver.wait_result("late", 0.05)  # the decoder gives up
            result = await _send(node, levels, layout, config, tokens, kv, "late")
            await _until(lambda: free.num_free == before)  # well before the 60 s TTL
            assert node.receiver.num_unclaimed == 0
            return result

    assert run(main()).status.ok
