"""Goodput of KV over each data plane against a plain TCP socket (and memcpy).

    python -m bench.transfer [--quick] [--json FILE] [--planes grpc,tcp,shm,mooncake]

Every row moves the same bytes in the same run, sender in this process and
receiver in a separate process, over 127.0.0.1:

* ``KVSender`` -> ``StreamKV`` -> ``KVReceiver`` with ``transfer.data_plane``
  set to each plane: several (4) concurrent requests (one HTTP/2 stream each,
  spread over ``num_channels`` connections), XXH3-64 checked on the receiver
  (the sender's is computed once per chunk, as a kvstore would keep it). The
  payload level is a pass-through ("raw") codec, so the figure is the
  transport's, not a codec's.
  - ``grpc``: payloads inline, split into ``message_payload_bytes`` messages,
    assembled on the receiver;
  - ``tcp``: our socket channel, striped over ``data_plane_connections``
    connections, ``recv_into`` the receiver's registered windows;
  - ``shm``: one copy into the receiver's shared-memory window;
  - ``mooncake``: the Mooncake Transfer Engine's TCP transport (only where it
    imports; it binds every interface, so it runs in a private network
    namespace, in a second run of this benchmark that measures its own socket
    baseline there).
* TCP socket: one socket, ``sendall`` of the same chunk bytes, ``recv_into`` a
  preallocated buffer: the baseline of ``grpc``, ``tcp`` and ``mooncake``.
* memcpy: the same bytes copied into touched memory in this process: the
  baseline of ``shm``.

The KV bytes are synthetic (random fp16 values in SmolLM2's layout: 30 layers,
3 KV heads, head_dim 64, 1024-token chunks of 22.5 MiB); content does not
matter to a transport. Each row runs ``rounds`` times, interleaved; the
table shows every round with the CPU seconds each side spent per GB (a figure
less sensitive than wall time to other load on the machine). JSON:
``grpc_vs_tcp``, ``data_plane_tcp_vs_tcp``, ``data_plane_shm_vs_memcpy``,
``data_plane_mooncake_vs_tcp`` (ratios of the best rounds).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
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
                        max_message_bytes=64 << 20, timeout_s=120.0, chunk_timeout_s=30.0,
                        data_plane_window_bytes=64 << 20, data_plane_buffer_bytes=256 << 20)
PLANES = ("grpc", "tcp", "shm", "mooncake")
BASELINE = {"grpc": "tcp socket", "tcp": "tcp socket", "shm": "memcpy",
            "mooncake": "tcp socket"}
"""What each plane is measured against (in the same run)."""


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_flags)
    total_bytes = (256 << 20) if args.quick else (1 << 30)
    num_requests = args.streams
    payload = _chunk_bytes()
    chunks_per_request = max(1, round(total_bytes / len(payload) / num_requests))
    moved = chunks_per_request * num_requests * len(payload)
    config = replace(CONFIG, message_payload_bytes=args.message_kib << 10)
    planes, notes = _planes(args.planes.split(","), args.in_namespace)
    transports = ["tcp socket", *(["memcpy"] if "shm" in planes else []), *planes]
    rates = {name: [] for name in transports}
    cpu = {name: [] for name in transports}
    rows = []
    for round_no in range(args.rounds):
        for name in transports:
            rate, *spent = _run(name, payload, chunks_per_request, num_requests, config)
            rates[name].append(rate)
            cpu[name].append(spent)
            rows.append([round_no, name, 1 if name in BASELINE.values() else num_requests,
                         _gbs(rate), *spent])
    best = {name: max(r) / 1e9 for name, r in rates.items()}
    print_table(f"KV goodput, {moved / 2**30:.2f} GiB per run ({len(payload) >> 20} MiB "
                f"chunks, {config.message_payload_bytes >> 10} KiB messages, "
                f"{config.num_channels} channels, {config.data_plane_connections} data "
                f"connections)", ["round", "transport", "streams", "GB/s", "sender CPU s/GB",
                                  "receiver CPU s/GB"], rows)
    result = {
        "bytes_moved": moved, "chunk_bytes": len(payload),
        "message_payload_bytes": config.message_payload_bytes,
        "num_streams": num_requests, "num_channels": config.num_channels,
        "data_plane_connections": config.data_plane_connections,
        "gbps": {name: [r / 1e9 for r in values] for name, values in rates.items()},
        "best_gbps": best, "cpu_s_per_gb": cpu, "notes": notes,
        "tcp_best_gbps": best["tcp socket"],
        "kv": "synthetic fp16 bytes in the SmolLM2 layout", "quick": args.quick,
    }
    for plane in planes:
        key = "grpc_vs_tcp" if plane == "grpc" else \
            f"data_plane_{plane}_vs_{'memcpy' if plane == 'shm' else 'tcp'}"
        result[key] = best[plane] / best[BASELINE[plane]]
    if "grpc" in planes:
        result["grpc_best_gbps"] = best["grpc"]
        result["grpc_vs_tcp_median"] = (statistics.median(rates["grpc"])
                                        / statistics.median(rates["tcp socket"]))
    if "mooncake" in args.planes.split(",") and "mooncake" not in planes:
        result.update(_mooncake_in_namespace(args, notes))
    for key in ("grpc_vs_tcp", "data_plane_tcp_vs_tcp", "data_plane_shm_vs_memcpy",
                "data_plane_mooncake_vs_tcp"):
        if key in result:
            print(f"{key} (best/best) = {result[key]:.2f}")
    for note in notes:
        print(note)
    write_json(args.json, result)
    return result


def _extra_flags(parser) -> None:
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="concurrent requests")
    parser.add_argument("--message-kib", type=int, default=4096)
    parser.add_argument("--planes", default=",".join(PLANES),
                        help="data planes to measure, comma separated")
    parser.add_argument("--in-namespace", action="store_true",
                        help="internal: this run is inside a private network namespace")


def _planes(wanted: list[str], in_namespace: bool) -> tuple[list[str], list[str]]:
    """The planes this run measures itself; mooncake only inside a private namespace."""
    from kvcluster.transfer.data_plane.mooncake import mooncake_unavailable

    planes, notes = [], []
    for plane in wanted:
        if plane not in PLANES:
            raise SystemExit(f"unknown data plane {plane!r}; known: {PLANES}")
        if plane == "mooncake":
            why = mooncake_unavailable()
            if why:
                notes.append(f"mooncake not measured: {why}")
                continue
            if not in_namespace:
                continue  # measured by a second run inside a namespace (_mooncake_in_namespace)
        planes.append(plane)
    return planes, notes


def _mooncake_in_namespace(args, notes: list[str]) -> dict:
    """Run this benchmark for mooncake (and its own socket baseline) inside a private
    network namespace: the engine's listeners bind every interface."""
    from kvcluster.transfer.netns import netns_available

    ok, why = netns_available()
    if not ok:
        notes.append(f"mooncake not measured: its listeners bind every interface and "
                     f"network namespaces are unavailable ({why})")
        return {}
    namespace = f"kvbm{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            argv = ["ip", "netns", "exec", namespace, sys.executable, "-m", "bench.transfer",
                    "--planes", "mooncake", "--in-namespace", "--json", out.name,
                    "--rounds", str(args.rounds), "--streams", str(args.streams),
                    *(["--quick"] if args.quick else [])]
            subprocess.run(argv, check=True)
            inner = json.loads(open(out.name).read())
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    notes.append("mooncake: measured in a private network namespace against a socket "
                 f"there ({inner['best_gbps']['tcp socket']:.2f} GB/s best)")
    return {"data_plane_mooncake_vs_tcp": inner["data_plane_mooncake_vs_tcp"],
            "mooncake": {k: inner[k] for k in ("gbps", "best_gbps", "cpu_s_per_gb")}}


def _run(name: str, payload: bytes, chunks_per_request: int, num_requests: int,
         config: TransferConfig) -> tuple[float, float, float]:
    if name == "tcp socket":
        return _run_tcp(payload, chunks_per_request * num_requests)
    if name == "memcpy":
        return _run_memcpy(payload, chunks_per_request * num_requests)
    return _run_grpc(payload, chunks_per_request, num_requests,
                     replace(config, data_plane=name))


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
        if result.data_plane != config.data_plane or (
                config.data_plane != "grpc" and result.data_plane_bytes != result.bytes_sent):
            raise RuntimeError(f"asked for data plane {config.data_plane}, got "
                               f"{result.data_plane} ({result.data_plane_bytes} of "
                               f"{result.bytes_sent} bytes)")
    return meter.stop(sum(r.status.payload_bytes for r in results))


# ---------------------------------------------------------------- baselines


def _run_memcpy(payload: bytes, num_chunks: int) -> tuple[float, float, float]:
    """One copy of every chunk into touched memory (a ring of 4 chunk buffers)."""
    source = np.frombuffer(payload, dtype=np.uint8)
    ring = [np.ones(len(payload), dtype=np.uint8) for _ in range(4)]
    meter = _CpuMeter(os.getpid(), receiver_is_self=True)
    for i in range(num_chunks):
        np.copyto(ring[i % len(ring)], source)
    return meter.stop(num_chunks * len(payload))



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

    def __init__(self, receiver_pid: int, receiver_is_self: bool = False):
        self.receiver_pid = receiver_pid
        self.receiver_is_self = receiver_is_self
        self.began = time.perf_counter()
        self.cpu = (_own_cpu_s(), _proc_cpu_s(receiver_pid))

    def stop(self, num_bytes: int) -> tuple[float, float, float]:
        """(bytes/s, sender CPU s per GB, receiver CPU s per GB; 0 for one process)."""
        elapsed = time.perf_counter() - self.began
        gigabytes = num_bytes / 1e9
        receiver = 0.0 if self.receiver_is_self else \
            (_proc_cpu_s(self.receiver_pid) - self.cpu[1]) / gigabytes
        return num_bytes / elapsed, (_own_cpu_s() - self.cpu[0]) / gigabytes, receiver


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
