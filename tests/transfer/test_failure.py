"""Failures with real processes and sockets: a sender that dies or goes silent
mid-stream, and chunks that fail their checksum."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
import torch

from kvcluster.transfer.messages import StreamCode
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


async def _start_sender(tiny_dir, address, request_id, num_tokens, seed):
    # ~8 KiB per lossless chunk at 256 kbit/s: about 0.25 s per chunk
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.transfer.sender_proc", str(tiny_dir), address,
        request_id, str(num_tokens), str(seed), "256000",
        cwd=REPO, stdout=asyncio.subprocess.PIPE)


async def _wait_for_line(proc, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
        if not line:
            raise AssertionError(f"sender exited before printing {text!r}")
        if line.decode().strip() == text:
            return
    raise AssertionError(f"sender never printed {text!r}")


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_sender_dies_mid_stream_receiver_recomputes(tiny_dir, sender_runner, receiver_runner,
                                                    levels, how):
    """SIGKILL: the connection drops; SIGSTOP: the sender goes silent until the idle timeout."""
    num_tokens, seed = 160, 7  # 10 chunks
    config = small_config(chunk_timeout_s=1.0)

    async def main():
        async with receiver_node(receiver_runner, levels, config,
                                 prefill_tokens_per_s=1000.0) as node:
            proc = await _start_sender(tiny_dir, node.server.address, "dies", num_tokens, seed)
            try:
                await _wait_for_line(proc, "sending 3")
                began = time.perf_counter()
                proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                received = await node.receiver.wait_result("dies", 10)
                return received, node.kv("dies"), time.perf_counter() - began
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    received, got, waited_s = run(main())
    status = received.status
    assert status.code == StreamCode.RECOMPUTED
    assert 1 <= status.num_chunks_decoded <= 4
    assert status.num_chunks_decoded + status.num_chunks_recomputed == 10
    assert received.stats.levels[9] == "recomputed"
    if how == "stopped":
        assert "silent" in status.message and waited_s >= 0.9
    assert waited_s < 8
    expected = prefill_kv(sender_runner, prompt(num_tokens, seed))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _corrupt(bad: set[tuple[int, int]]):
    """Flip a byte of the first part of chunk i at attempt a, for each (i, a) in ``bad``."""
    def payload_filter(index, attempt, piece):
        if (index, attempt) in bad:
            bad.discard((index, attempt))
            data = bytearray(piece)
            data[len(data) // 2] ^= 0xFF
            return bytes(data)
        return piece
    return payload_filter


@pytest.mark.parametrize("bad, resends, recomputed", [
    ({(1, 0)}, 1, 0),                    # one bad send: re-requested, then fine
    ({(2, 0), (2, 1), (2, 2)}, 2, 1),    # keeps failing: given up after max_resends, recomputed
])
def test_corrupt_chunk_is_rerequested_or_recomputed(sender_runner, receiver_runner, layout,
                                                    levels, bad, resends, recomputed):
    tokens = prompt(64, seed=3)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(max_resends=2)

    async def main():
        async with receiver_node(receiver_runner, levels, config,
                                 prefill_tokens_per_s=1000.0) as node:
            async with KVSender(node.server.address, levels, config,
                                policy=make_policy(levels.best, levels.names)) as sender:
                source = ChunkSource(tokens, layout, levels, config.chunk_tokens, kv=kv)
                result = await sender.send(source, "c", payload_filter=_corrupt(set(bad)))
                return result, await node.receiver.wait_result("c", 5), node.kv("c")

    result, received, got = run(main())
    assert result.resends == resends
    assert result.status.num_chunks_recomputed == recomputed
    assert result.status.num_chunks_decoded == 4 - recomputed
    torch.testing.assert_close(got, kv, rtol=1e-4, atol=1e-4)
