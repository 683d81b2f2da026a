"""Goodput of KV over loopback gRPC (our KVTransfer stream) against a plain TCP socket.

    python -m bench.transfer [--quick] [--json FILE]

Both move the same bytes in the same run, sender in this process and receiver
in a separate process, over 127.0.0.1:

* gRPC: ``KVSender`` -> ``StreamKV`` -> ``KVReceiver``: several (4) concurrent
  requests (one HTTP/2 stream each, spread over ``num_channels`` TCP
  connections), chunks split into ``message_payload_bytes`` messages, XXH3-64
  on both ends, chunk assembly on the receiver. The payload level is a
  pass-through ("raw") codec, so the figure is the transport's, not a codec's.
* TCP: one socket, ``sendall`` of the same chunk bytes, ``recv_into`` a
  preallocated buffer.

The KV bytes are synthetic (random fp16 values in SmolLM2's layout: 30 layers,
3 KV heads, head_dim 64, 1024-token chunks of 22.5 MiB); content does not
matter to a transport. Each side runs ``rounds`` times, alternating; the
table shows every round with the CPU seconds each side spent per GB (a figure
less sensitive than wall time to other load on the machine), and the ratio of
the best rounds (``grpc_vs_tcp``).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
from dataclasses import replace

import torch

from bench.common import parse_args, print_table, write_json
from kvcluster.common.config import TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sink import KVSink

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")
CHUNK_TOKENS = 1024
CONFIG = TransferConfig(num_channels=4, max_inflight_chunks=2, message_payload_bytes=4 << 20,
                        max_message_bytes=64 << 20, timeout_s=120.0, chunk_timeout_s=30.0)


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_flags)
    total_bytes = (256 << 20) if args.quick else (1 << 30)
    num_requests = args.streams
    payload = _chunk_bytes()
    chunks_per_request = max(1, round(total_bytes / len(payload) / num_requests))
    moved = chunks_per_request * num_requests * len(payload)
    config = replace(CONFIG, message_payload_bytes=args.message_kib << 10)
    rows, tcp_rates, grpc_rates, cpu = [], [], [], {"tcp": [], "grpc": []}
    for round_no in range(args.rounds):
        rate, *tcp_cpu = _run_tcp(payload, chunks_per_request * num_requests)
        tcp_rates.append(rate)
        rate, *grpc_cpu = _run_grpc(payload, chunks_per_request, num_requests, config)
        grpc_rates.append(rate)
        cpu["tcp"].append(tcp_cpu)
        cpu["grpc"].append(grpc_cpu)
        rows.append([round_no, "tcp", 1, _gbs(tcp_rates[-1]), *tcp_cpu])
        rows.append([round_no, "grpc", num_requests, _gbs(grpc_rates[-1]), *grpc_cpu])
    ratio = max(grpc_rates) / max(tcp_rates)
    print_table(f"KV goodput over loopback, {moved / 2**30:.2f} GiB per run "
                f"({len(payload) >> 20} MiB chunks, {config.message_payload_bytes >> 10} KiB "
                f"messages, {config.num_channels} channels)",
                ["round", "transport", "streams", "GB/s", "sender CPU s/GB",
                 "receiver CPU s/GB"], rows)
    result = {
        "bytes_moved": moved, "chunk_bytes": len(payload),
        "message_payload_bytes": config.message_payload_bytes,
        "num_streams": num_requests, "num_channels": config.num_channels,
        "tcp_gbps": [r / 1e9 for r in tcp_rates], "grpc_gbps": [r / 1e9 for r in grpc_rates],
        "tcp_best_gbps": max(tcp_rates) / 1e9, "grpc_best_gbps": max(grpc_rates) / 1e9,
        "grpc_vs_tcp": ratio,
        "grpc_vs_tcp_median": statistics.median(grpc_rates) / statistics.median(tcp_rates),
        "cpu_s_per_gb": cpu,
        "kv": "synthetic fp16 bytes in the SmolLM2 layout", "quick": args.quick,
    }
    print(f"grpc_vs_tcp (best/best) = {ratio:.2f}   "
          f"median/median = {result['grpc_vs_tcp_median']:.2f}")
    write_json(args.json, result)
    return result


def _extra_flags(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="concurrent requests")
    parser.add_argument("--message-kib", type=int, default=4096)


# ---------------------------------------------------------------- gRPC


class _PassThroughCodec:
    """Bench-only level "raw": the bytes are the KV; decoding is a no-copy view."""

    name = "raw"

    def encode(self, kv, layout):
        return kv.contiguous().numpy().tobytes()

    def decode(self, data, layout):
        return data


class _CountingSink(KVSink):
    def __init__(self):
        self.num_bytes = 0

    def write_chunk(self, index, token_range, kv) -> None:
        self.num_bytes += len(kv)

    def recompute_chunk(self, index, token_range, token_ids) -> None:
        raise RuntimeError("the goodput bench never recomputes")


def _levels() -> LevelSet:
    return LevelSet({"raw": _PassThroughCodec()})


def _grpc_receiver(config: TransferConfig, port_queue) -> None:
    import uvloop

    from kvcluster.transfer.receiver import KVReceiver
    from kvcluster.transfer.server import TransferServer

    async def serve():
        receiver = KVReceiver(LAYOUT, _levels(), lambda header: _CountingSink(), config)
        server = TransferServer(receiver, config)
        port_queue.put(await server.start())
        await server.wait_for_termination()

    uvloop.run(serve())


def _run_grpc(payload: bytes, chunks_per_request: int, num_requests: int,
              config: TransferConfig) -> float:
    import uvloop

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_grpc_receiver, args=(config, ports), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=60)
        return uvloop.run(_send_all(f"127.0.0.1:{port}", payload, chunks_per_request,
                                    num_requests, config, proc.pid))
    finally:
        proc.kill()
        proc.join()


async def _send_all(target, payload, chunks_per_request, num_requests, config,
                    receiver_pid: int) -> tuple[float, float, float]:
    from kvcluster.transfer.sender import KVSender
    from kvcluster.transfer.source import ChunkSource

    levels = _levels()
    sources = []
    for _ in range(num_requests):
        tokens = list(range(chunks_per_request * CHUNK_TOKENS))
        source = ChunkSource(tokens, LAYOUT, levels, CHUNK_TOKENS)
        for index in range(source.num_chunks):
            source.add_encoded(index, "raw", payload)
        sources.append(source)
    async with KVSender(target, levels, config, policy=make_policy("raw", ["raw"])) as sender:
        # Connections up, code paths and the receiver's buffer pool warm.
        await asyncio.gather(*[sender.send(s, f"warmup{i}") for i, s in enumerate(sources)])
        meter = _CpuMeter(receiver_pid)
        results = await asyncio.gather(*[sender.send(s, f"r{i}") for i, s in enumerate(sources)])
    for result in results:
        if result.status is None or not result.status.ok:
            raise RuntimeError(f"gRPC transfer failed: {result.error or result.status}")
    return meter.stop(sum(r.status.payload_bytes for r in results))


# ---------------------------------------------------------------- TCP


def _tcp_receiver(port_queue, buffer_bytes: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    buffer = memoryview(bytearray(buffer_bytes))
    total = 0
    while (n := conn.recv_into(buffer)):
        total += n
    conn.sendall(total.to_bytes(8, "little"))
    conn.close()


def _run_tcp(payload: bytes, num_chunks: int) -> float:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_tcp_receiver, args=(ports, 4 << 20), daemon=True)
    proc.start()
    try:
        sock = socket.create_connection(("127.0.0.1", ports.get(timeout=60)))
        meter = _CpuMeter(proc.pid)
        for _ in range(num_chunks):
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = int.from_bytes(sock.recv(8), "little")
        measured = meter.stop(received)
        sock.close()
    finally:
        proc.join(timeout=10)
        proc.kill()
    if received != num_chunks * len(payload):
        raise RuntimeError(f"TCP receiver got {received} bytes")
    return measured


class _CpuMeter:
    """Wall time and CPU seconds (this process and the receiver's) over a transfer."""

    def __init__(self, receiver_pid: int):
        self.receiver_pid = receiver_pid
        self.began = time.perf_counter()
        self.cpu = (_own_cpu_s(), _proc_cpu_s(receiver_pid))

    def stop(self, num_bytes: int) -> tuple[float, float, float]:
        """(bytes/s, sender CPU s per GB, receiver CPU s per GB)."""
        elapsed = time.perf_counter() - self.began
        gigabytes = num_bytes / 1e9
        return (num_bytes / elapsed, (_own_cpu_s() - self.cpu[0]) / gigabytes,
                (_proc_cpu_s(self.receiver_pid) - self.cpu[1]) / gigabytes)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _chunk_bytes() -> bytes:
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYOUT.shape(CHUNK_TOKENS), generator=generator).to(torch.float16)
    return kv.numpy().tobytes()


def _gbs(bytes_per_s: float) -> float:
    return bytes_per_s / 1e9


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
