"""Faults and bad input on the data planes, with real sockets, shared memory and
processes: a wrong or replayed token, a range outside the window, a length that does
not match the chunk's header, a torn stripe, a corrupt payload, a sender killed
mid-transfer, a cut link. Each ends in a clear error or a recompute; nothing lands
outside the window it was meant for, nothing hangs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from kvcluster.transfer.data_plane.base import DataPlaneError
from kvcluster.transfer.data_plane.tcp import TcpReceiverPlane
from kvcluster.transfer.data_plane.tcp_framing import FrameHeader
from kvcluster.transfer.messages import DataRef, StreamCode, StreamHeader
from kvcluster.transfer.netns import NetnsPair, netns_available
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import (
    load_levels, make_runner, prefill_kv, prompt, run, small_config,
)
from tests.transfer.helpers import receiver_node
from tests.transfer.test_failure import _start_sender, _wait_for_line

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = StreamHeader("r", "L1", 1, 4, (1, 2, 3, 4), 4)
NETNS, WHY = netns_available()


# ---------------------------------------------------------------- the tcp channel, raw


async def _plane(window_bytes: int = 1 << 16):
    plane = TcpReceiverPlane("127.0.0.1", 0, 1 << 20, 2, idle_timeout_s=1.0)
    await plane.start()
    window = plane.open(HEADER, window_bytes)
    window.lease.buffer[:] = 0x5A
    return plane, window


def _frames(port: int, *frames: bytes, close_after: bool = False) -> bytes:
    """Send raw bytes to the data listener; returns what comes back before it closes
    (b"": the receiver closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for frame in frames:
            sock.sendall(frame)
        if close_after:
            return b"sent"
        try:
            return sock.recv(16)
        except (ConnectionResetError, socket.timeout):
            return b""


async def _in_thread(fn, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def _frame(token: bytes, write_id: int, length: int, offset: int = 0, total: int = 0,
           fill: bytes = b"\xff") -> bytes:
    header = FrameHeader(token, write_id, total or length, offset, length).pack()
    return header + fill * length


def test_wrong_and_replayed_tokens_close_the_connection_and_write_nothing():
    async def main():
        plane, window = await _plane()
        try:
            wrong = await _in_thread(_frames, plane.port, _frame(b"\x01" * 16, 1, 64))
            token = window.grant.token
            window.close(clean=True)  # the transfer is over: its token is spent
            replayed = await _in_thread(_frames, plane.port, _frame(token, 2, 64))
            return wrong, replayed, bytes(window.lease.buffer[:128]), plane.rejected_frames
        finally:
            await plane.stop()

    wrong, replayed, contents, rejected = run(main())
    assert wrong == replayed == b"" and rejected == 2
    assert contents == b"\x5a" * 128


def test_a_range_outside_the_window_is_refused_before_any_byte_lands():
    async def main():
        plane, window = await _plane(window_bytes=4096)
        try:
            size = window.size
            reply = await _in_thread(_frames, plane.port,
                                     _frame(window.grant.token, 1, 64, offset=size - 8))
            return reply, bytes(window.lease.buffer), size, plane.rejected_frames
        finally:
            await plane.stop()

    reply, contents, size, rejected = run(main())
    assert reply == b"" and rejected == 1
    assert contents == b"\x5a" * size  # not even the 8 bytes that would have fit


def test_frames_that_disagree_with_the_chunk_header_fail_the_write():
    async def main():
        plane, window = await _plane()
        token = window.grant.token
        try:
            await _in_thread(_frames, plane.port, _frame(token, 1, 100), close_after=True)
            with pytest.raises(DataPlaneError, match="carry 100 bytes, the chunk header says 200"):
                await window.landed(DataRef(0, 200, 1), 5)
            await _in_thread(_frames, plane.port, _frame(token, 2, 50, offset=1000),
                             close_after=True)
            with pytest.raises(DataPlaneError, match="cover"):
                await window.landed(DataRef(0, 50, 2), 5)  # bytes landed elsewhere
            await _in_thread(_frames, plane.port, _frame(token, 3, 10, fill=b"\x01"),
                             close_after=True)
            assert bytes(await window.landed(DataRef(0, 10, 3), 5)) == b"\x01" * 10
            replay = await _in_thread(_frames, plane.port, _frame(token, 3, 10, fill=b"\x02"))
            assert replay == b""  # a consumed write id is not written twice
            assert bytes(window.lease.buffer[:10]) == b"\x01" * 10
        finally:
            await plane.stop()

    run(main())


def test_a_torn_stripe_fails_fast_and_a_missing_one_times_out():
    async def main():
        plane, window = await _plane()
        token = window.grant.token
        try:
            torn = FrameHeader(token, 1, 1000, 0, 1000).pack() + b"\x00" * 10
            await _in_thread(_frames, plane.port, torn, close_after=True)
            began = time.monotonic()
            with pytest.raises(DataPlaneError, match="broke"):
                await window.landed(DataRef(0, 1000, 1), 5)
            assert time.monotonic() - began < 2
            with pytest.raises(asyncio.TimeoutError):
                await window.landed(DataRef(0, 10, 99), 0.2)
        finally:
            await plane.stop()

    run(main())


def test_a_window_with_a_stripe_in_flight_is_not_lent_again_until_it_ends():
    async def main():
        plane, window = await _plane()
        sock = socket.create_connection(("127.0.0.1", plane.port))
        try:
            sock.sendall(FrameHeader(window.grant.token, 1, 4096, 0, 4096).pack() + b"\x00")
            await asyncio.sleep(0.2)
            window.close(clean=False)
            held = plane.pool.num_free
            sock.close()  # the stripe ends (torn)
            for _ in range(50):
                if plane.pool.num_free:
                    break
                await asyncio.sleep(0.02)
            return held, plane.pool.num_free
        finally:
            await plane.stop()

    assert run(main()) == (0, 1)


# ---------------------------------------------------------------- through the whole stack


@pytest.fixture(scope="module")
def tiny_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def sender_runner(tiny_dir):
    return make_runner(tiny_dir)


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


@pytest.fixture(scope="module")
def layout(sender_runner):
    return sender_runner.layout


@pytest.fixture(scope="module")
def levels():
    return load_levels()


def _filtered(sender_runner, receiver_runner, layout, levels, plane, payload_filter):
    tokens = prompt(64, seed=31)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(data_plane=plane, max_resends=2)

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            async with KVSender(node.server.address, levels, config,
                                policy=make_policy(levels.best, levels.names)) as sender:
                source = ChunkSource(tokens, layout, levels, 16, kv=kv)
                result = await sender.send(source, "f", payload_filter=payload_filter)
                return result, await node.receiver.wait_result("f", 5), node.kv("f")

    result, received, got = run(main())
    assert torch.equal(got, kv)
    return result, received


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_corrupt_or_short_data_plane_payloads_are_resent_inline(sender_runner, receiver_runner,
                                                                layout, levels, plane):
    def corrupt(index, attempt, piece):
        if (index, attempt) == (1, 0):
            data = bytearray(piece)
            data[len(data) // 2] ^= 0xFF
            return bytes(data)
        return piece

    def short(index, attempt, piece):
        return piece[:-7] if (index, attempt) == (2, 0) else piece

    for fault in (corrupt, short):
        result, received = _filtered(sender_runner, receiver_runner, layout, levels, plane,
                                     fault)
        assert result.data_plane == plane and result.resends == 1, fault.__name__
        assert received.status.code == StreamCode.OK and received.status.num_chunks_decoded == 4


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_sender_killed_mid_transfer_receiver_recomputes_and_recovers_its_window(
        tiny_dir, sender_runner, receiver_runner, levels, plane):
    num_tokens, seed = 160, 8  # 10 chunks at ~0.25 s each

    async def main():
        config = small_config(chunk_timeout_s=1.0, data_plane=plane)
        async with receiver_node(receiver_runner, levels, config,
                                 prefill_tokens_per_s=1000.0) as node:
            proc = await _start_sender(tiny_dir, node.server.address, "k", num_tokens, seed)
            try:
                await _wait_for_line(proc, "sending 3")
                proc.send_signal(signal.SIGKILL)
                received = await node.receiver.wait_result("k", 10)
                await asyncio.sleep(0.2)  # the torn connection's thread lets go
                stats = node.receiver.data_plane_stats()
                return received, node.kv("k"), stats
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    received, got, stats = run(main())
    assert received.status.code == StreamCode.RECOMPUTED
    assert received.status.num_chunks_decoded + received.status.num_chunks_recomputed == 10
    assert stats["grants"] == {plane: 1}
    if plane == "tcp":
        assert stats["tcp"]["live_transfers"] == 0
    else:
        assert stats["shm"]["retired_windows"] == 1  # a late copy would land nowhere read
    torch.testing.assert_close(got, prefill_kv(sender_runner, prompt(num_tokens, seed)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not NETNS, reason=f"network namespaces unavailable: {WHY}")
def test_cut_link_mid_tcp_transfer_receiver_recomputes(tiny_dir):
    """Sender in namespace A, receiver in B (two nodes to the data plane: tcp), the veth
    goes down after 3 chunks: the receiver recomputes the rest after its 1 s timeout."""
    pair = NetnsPair(f"kvd{os.getpid() % 100000}", subnet="10.231.11").create()
    receiver = subprocess.Popen(pair.exec_argv(pair.ns_b, [
        sys.executable, "-m", "tests.transfer.receiver_proc", str(tiny_dir), pair.addr_b,
        "cut", "160", "9", "auto"]), cwd=REPO, stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        address = receiver.stdout.readline().split()[1]
        sender = subprocess.Popen(pair.exec_argv(pair.ns_a, [
            sys.executable, "-m", "tests.transfer.sender_proc", str(tiny_dir), address, "cut",
            "160", "9", "256000", "auto"]), cwd=REPO, stdout=subprocess.PIPE, text=True)
        while (line := sender.stdout.readline().strip()) != "sending 3":
            assert line, "sender exited early"
        subprocess.run(["ip", "-n", pair.ns_a, "link", "set", pair.dev_a, "down"], check=True)
        began = time.monotonic()
        line = receiver.stdout.readline()
        waited = time.monotonic() - began
        result = json.loads(line.split(" ", 1)[1])
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                proc.kill()
                proc.wait()
        pair.destroy()
    assert result["grants"] == {"tcp": 1}  # across namespaces: the tcp channel, not shm
    assert result["code"] == "RECOMPUTED" and result["recomputed"] >= 1, result
    assert result["kv_exact"] and waited < 10
