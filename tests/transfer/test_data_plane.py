"""End to end over each data plane, real gRPC and real sockets / shared memory on
127.0.0.1: tiny engine KV -> codec -> data plane + control stream -> paged blocks."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from kvcluster.transfer.data_plane import tcp_framing
from kvcluster.transfer.data_plane.factory import make_receiver_planes
from kvcluster.transfer.messages import StreamCode
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.security import ChannelSecurity, ServerSecurity
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node
from tests.transfer.test_security import _write_ca


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


def node_with(runner, levels, config, node_id=None, security=None):
    """A receiver node whose data planes see themselves on ``node_id`` (None: this one)."""
    return receiver_node(runner, levels, config, security=security,
                         data_planes=make_receiver_planes(config, security, node_id))


async def _send(node, levels, layout, config, tokens, kv, request_id, security=None, **kw):
    async with KVSender(node.server.address, levels, config, security=security,
                        policy=make_policy(levels.best, levels.names)) as sender:
        source = ChunkSource(tokens, layout, levels, config.chunk_tokens, kv=kv)
        result = await sender.send(source, request_id, **kw)
        received = await node.receiver.wait_result(request_id, 5)
        return result, received, node.kv(request_id)


@pytest.mark.parametrize("plane", ["grpc", "tcp", "shm"])
def test_each_plane_moves_bit_exact_kv(sender_runner, receiver_runner, layout, levels, plane):
    tokens = prompt(70, seed=11)  # 5 chunks, the last one partial
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(data_plane=plane)

    async def main():
        async with node_with(receiver_runner, levels, config) as node:
            out = await _send(node, levels, layout, config, tokens, kv, "p")
            return (*out, node.receiver.data_plane_stats())

    result, received, got, stats = run(main())
    assert result.status.code == StreamCode.OK and result.data_plane == plane
    assert torch.equal(got, kv)
    assert received.status.num_chunks_decoded == 5
    inline = plane == "grpc"
    assert result.data_plane_bytes == (0 if inline else result.bytes_sent) and result.bytes_sent
    assert stats["grants"] == ({"grpc": 1} if inline else {plane: 1})


def test_auto_is_shm_on_one_node_and_tcp_across_nodes(sender_runner, receiver_runner, layout,
                                                     levels):
    tokens = prompt(48, seed=12)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config()  # data_plane "auto"

    async def main():
        planes = []
        for node_id in (None, "host:elsewhere"):
            async with node_with(receiver_runner, levels, config, node_id) as node:
                result, _, got = await _send(node, levels, layout, config, tokens, kv, "a")
                planes.append((result.data_plane, torch.equal(got, kv)))
        return planes

    assert run(main()) == [("shm", True), ("tcp", True)]


def test_chunks_larger_than_the_window_go_inline(sender_runner, receiver_runner, layout,
                                                 levels):
    tokens = prompt(70, seed=13)
    kv = prefill_kv(sender_runner, tokens)
    window = 4096
    config = small_config(data_plane="tcp", data_plane_window_bytes=window)

    async def main():
        async with node_with(receiver_runner, levels, config) as node:
            return await _send(node, levels, layout, config, tokens, kv, "w")

    result, _, got = run(main())
    source = ChunkSource(tokens, layout, levels, 16, kv=kv)
    sizes = [len(source.payload(i, levels.best)) for i in range(5)]
    assert result.data_plane == "tcp" and torch.equal(got, kv)
    assert result.data_plane_bytes == sum(n for n in sizes if n <= window) < result.bytes_sent


def test_concurrent_transfers_share_the_tcp_connections(sender_runner, receiver_runner,
                                                        layout, levels):
    config = small_config(data_plane="tcp", data_plane_connections=2)
    prompts = [prompt(64, seed=20 + i) for i in range(3)]
    kvs = [prefill_kv(sender_runner, t) for t in prompts]

    async def main():
        async with node_with(receiver_runner, levels, config) as node:
            async with KVSender(node.server.address, levels, config,
                                policy=make_policy(levels.best, levels.names)) as sender:
                sources = [ChunkSource(t, layout, levels, 16, kv=k) for t, k in zip(prompts, kvs)]
                results = await asyncio.gather(*[sender.send(s, f"c{i}")
                                                 for i, s in enumerate(sources)])
                for i in range(3):
                    await node.receiver.wait_result(f"c{i}", 5)
                pools = sender.data_planes._planes["tcp"]._pools
                sizes = [len(pool) for pool in pools.values()]
                return results, [node.kv(f"c{i}") for i in range(3)], sizes

    results, got, pool_sizes = run(main())
    assert [r.data_plane for r in results] == ["tcp"] * 3
    assert all(torch.equal(g, k) for g, k in zip(got, kvs))
    assert pool_sizes == [2]  # one pool for the receiver, two connections


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _write_ca(tmp_path_factory.mktemp("dp-pki"), "server")


def test_tcp_plane_uses_tls_when_the_transfer_does(pki, sender_runner, receiver_runner,
                                                   layout, levels):
    tokens = prompt(48, seed=14)
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(data_plane="tcp")
    server = ServerSecurity(pki["cert"], pki["key"])

    async def main():
        async with node_with(receiver_runner, levels, config, security=server) as node:
            out = await _send(node, levels, layout, config, tokens, kv, "t",
                              ChannelSecurity(pki["ca"], server_name="localhost"))
            port = node.server.data_planes.planes["tcp"].port
            plaintext = await asyncio.get_running_loop().run_in_executor(
                None, _plaintext_frame, port)
            return (*out, plaintext)

    result, _, got, plaintext = run(main())
    assert result.data_plane == "tcp" and result.data_plane_bytes == result.bytes_sent
    assert torch.equal(got, kv)
    assert plaintext == b""  # the TLS listener drops a plaintext frame unread


def _plaintext_frame(port: int) -> bytes:
    header = tcp_framing.FrameHeader(b"\x00" * 16, 1, 8, 0, 8).pack()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(header + b"x" * 8)
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""
