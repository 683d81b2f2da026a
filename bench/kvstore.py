"""kvstore throughput: put/get per tier vs memcpy and vs the disk's own speed.

    python -m bench.kvstore [--quick] [--json FILE] [--dir DIR]

Chunks are 256 tokens in SmolLM2-135M's layout (30 layers, 3 KV heads,
head_dim 64, fp16): 5.9 MB each. Baselines are measured in the same run:

* memcpy: the fastest, in each round, of three plain copies of the same
  bytes into a preallocated, touched destination (one numpy copyto, one per
  5.9 MB chunk, torch ``copy_``); the host tier must reach >= 0.8x of it;
  tier and baseline are timed interleaved, ratios are medians of rounds;
* the disk: ``dd conv=fdatasync`` for writes and ``dd`` reading a file just
  dropped from the page cache (posix_fadvise DONTNEED) for reads. Disk-tier
  reads are measured the same way: every chunk file is dropped from the page
  cache first, and ``fincore`` shows how much stayed resident (goal: >= 0.7x);
  the tier reads with O_DIRECT (kvstore/tiers/direct_io.py), dd buffered.
* lookups: prefix lookups over a 100k-key list (goal: >= 1M keys/s).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import parse_args, print_table, write_json
from kvcluster.common.events import Tier
from kvcluster.common.hashing import BlockHash
from kvcluster.common.layout import KVLayout
from kvstore import ChunkSpec, TieredStore
from kvstore.metrics import StoreMetrics
from kvstore.policy import make_policy
from kvstore.tiers import DeviceTier, DiskTier, HostTier, RedisTier

SMOLLM2 = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float16")
SPEC = ChunkSpec(SMOLLM2, chunk_tokens=256)
GB = 1e9


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv,
                      extra=lambda p: p.add_argument("--dir", default=None,
                                                     help="disk tier folder (default: a temp dir)"))
    num_chunks, reps = (16, 5) if args.quick else (48, 9)
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-", dir=args.dir))
    try:
        results = run(num_chunks, reps, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    write_json(args.json, results)
    return results


def run(num_chunks: int, reps: int, workdir: Path) -> dict:
    keys = [BlockHash(os.urandom(32)) for _ in range(num_chunks)]
    kv = torch.randn(SMOLLM2.shape(num_chunks * SPEC.chunk_tokens)).half()  # [L, 2, n*256, H, D]
    out = torch.zeros_like(kv)
    r: dict = {"num_chunks": num_chunks, "chunk_bytes": SPEC.chunk_bytes,
               "filesystem": filesystem_of(workdir)}
    r.update(memory_figures(keys, kv, out, reps))
    r.update(disk_figures(keys, kv, out, workdir, 3 if reps < 9 else 5))
    r.update(redis_figures(keys[: max(4, num_chunks // 2)], kv, out, workdir))
    r["lookups_per_s"] = lookup_rate(100_000, reps)
    return r


def memory_figures(keys, kv, out, reps: int) -> dict:
    """Host and device tiers vs memcpy, measured interleaved (the machine's load
    drifts; each ratio is the median of per-round ratios)."""
    n = len(keys)
    total = n * SPEC.chunk_bytes
    kv_bytes, out_bytes = kv.view(torch.uint8).numpy(), out.view(torch.uint8).numpy()
    stores = {
        "host": TieredStore(SPEC, [HostTier(SPEC, total, make_policy("lru", n))],
                            metrics=StoreMetrics()),
        "device": TieredStore(SPEC, [DeviceTier(SPEC, total, make_policy("lru", n),
                                                device=default_device())],
                              metrics=StoreMetrics()),
    }
    flat_in, flat_out = kv_bytes.reshape(n, -1), out_bytes.reshape(n, -1)
    times: dict[str, list[float]] = {"memcpy": [], "memcpy_chunked": [], "torch_copy": []}
    for _ in range(reps + 1):  # round 0 is a warm-up
        times["memcpy"].append(timed(lambda: np.copyto(out_bytes, kv_bytes)))
        times["memcpy_chunked"].append(
            timed(lambda: [np.copyto(flat_out[i], flat_in[i]) for i in range(n)]))
        for name, store in stores.items():
            store.clear()
            times.setdefault(f"{name}_put", []).append(timed(lambda: store.put(keys, kv)))
            times.setdefault(f"{name}_get", []).append(timed(lambda: store.get(keys, out=out)))
            assert torch.equal(out, kv), f"{name} tier returned wrong bytes"
        # Last: torch's OpenMP threads keep spinning on the 2 cores after a copy.
        times["torch_copy"].append(timed(lambda: out.copy_(kv)))
        time.sleep(0.05)
        # The baseline is the fastest of the three plain copies in each round.
        times.setdefault("baseline", []).append(
            min(times[k][-1] for k in ("memcpy", "memcpy_chunked", "torch_copy")))
    r = {f"{k}_gbps": total / statistics.median(v[1:]) / GB for k, v in times.items()}
    for what in ("host_put", "host_get", "device_put", "device_get"):
        r[f"{what}_vs_memcpy"] = statistics.median(
            m / t for m, t in zip(times["baseline"][1:], times[what][1:]))
    return r


def disk_figures(keys, kv, out, workdir: Path, reps: int) -> dict:
    """Disk tier vs dd on the same filesystem, interleaved, page cache dropped
    before every read."""
    total = len(keys) * SPEC.chunk_bytes
    seq = workdir / "seq.bin"
    tier = DiskTier(SPEC, len(keys) * (SPEC.chunk_bytes + 4096), make_policy("lru", len(keys)),
                    directory=workdir / "tier", max_pending_writes=len(keys))
    store = TieredStore(SPEC, [tier], metrics=StoreMetrics(), promote_on_hit=False)
    dsts = list(torch.zeros((len(keys), *SPEC.shape), dtype=SPEC.dtype).unbind(0))  # touched
    t: dict[str, list[float]] = {k: [] for k in
                                 ("seq_write", "write", "seq_read", "read", "get_cold")}
    # Random bytes like the KV (a VM disk may read zeros back faster); the
    # source file sits in the page cache, so dd times the disk write only.
    source = workdir / "random.bin"
    source.write_bytes(kv.view(torch.uint8).numpy().tobytes()[: (total >> 22) << 22])
    dd_write = f"if={source} of={seq} bs=4M conv=fdatasync"
    for _ in range(reps):  # writes first: reads right after a write burst are slowed
        t["seq_write"].append(dd(dd_write))  # by the host's writeback
        seq.unlink()
        store.clear()
        t["write"].append(timed(lambda: (store.put(keys, kv), store.flush())))
    dd(dd_write)
    os.sync()
    time.sleep(1.0)
    resident = 0
    for _ in range(reps):
        drop_cache(seq)
        resident = max(resident, resident_bytes([seq]))
        t["seq_read"].append(dd(f"if={seq} of=/dev/null bs=4M"))
        resident = max(resident, drop_tier_cache(tier, keys))
        t["read"].append(timed(lambda: tier.read_many([k.digest for k in keys], dsts)))
        resident = max(resident, drop_tier_cache(tier, keys))
        t["get_cold"].append(timed(lambda: store.get(keys, out=out)))
        assert torch.equal(out, kv), "disk tier returned wrong bytes"
    seq.unlink()
    source.unlink()
    warm_s = timed(lambda: store.get(keys, out=out))
    store.close()
    seq_bytes = (total >> 22) << 22
    r = {f"disk_{k}_gbps": (seq_bytes if k.startswith("seq") else total)
         / statistics.median(v) / GB for k, v in t.items()}
    r["disk_get_warm_gbps"] = total / warm_s / GB
    r["disk_resident_after_drop_bytes"] = resident
    scale = total / seq_bytes  # dd moves whole 4 MiB blocks: a few bytes fewer

    def ratio(seq_s, tier_s):  # tier GB/s over dd GB/s, per round
        return statistics.median(scale * a / b for a, b in zip(seq_s, tier_s))

    r["disk_write_vs_seq"] = ratio(t["seq_write"], t["write"])
    r["disk_read_vs_seq"] = ratio(t["seq_read"], t["read"])
    r["disk_get_vs_seq"] = ratio(t["seq_read"], t["get_cold"])
    return r


def put_get_gbps(store: TieredStore, keys, kv, out, reps: int) -> tuple[float, float]:
    total = len(keys) * SPEC.chunk_bytes
    put_s, get_s = [], []
    for _ in range(reps):
        store.clear()
        put_s.append(timed(lambda: store.put(keys, kv)))
        get_s.append(timed(lambda: store.get(keys, out=out)))
    return total / statistics.median(put_s) / GB, total / statistics.median(get_s) / GB


def redis_figures(keys, kv, out, workdir: Path) -> dict:
    binary = shutil.which("redis-server")
    if binary is None:
        return {"redis": "skipped: no redis-server"}
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        total = len(keys) * SPEC.chunk_bytes
        tier = RedisTier(SPEC, total, make_policy("lru", len(keys)),
                         url=f"redis://127.0.0.1:{port}/0", model_id="bench")
        store = TieredStore(SPEC, [tier], metrics=StoreMetrics())
        tokens = len(keys) * SPEC.chunk_tokens
        put_gbps, get_gbps = put_get_gbps(store, keys, kv[:, :, :tokens], out[:, :, :tokens], 2)
        assert torch.equal(out[:, :, :tokens], kv[:, :, :tokens]), "redis returned wrong bytes"
        store.close()
        return {"redis_put_gbps": put_gbps, "redis_get_gbps": get_gbps}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def lookup_rate(num_keys: int, reps: int) -> float:
    """Keys per second through ``lookup`` over a fully stored ``num_keys`` list."""
    tiny = ChunkSpec(KVLayout(1, 1, 1, 16, "float16"), chunk_tokens=16)
    keys = [BlockHash(os.urandom(32)) for _ in range(num_keys)]
    tier = HostTier(tiny, num_keys * tiny.chunk_bytes, make_policy("lru", num_keys))
    store = TieredStore(tiny, [tier], metrics=StoreMetrics())
    store.put(keys, torch.zeros((num_keys, *tiny.shape), dtype=torch.float16))
    assert store.lookup(keys) == (num_keys, [Tier.HOST] * num_keys)
    return num_keys / median_s(reps, lambda: store.lookup(keys))


# ---------------------------------------------------------------- helpers


def dd(operands: str) -> float:
    """Run dd; the seconds from its summary line."""
    done = subprocess.run(["dd", *operands.split()], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    return float(match.group(2))


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tier_cache(tier: DiskTier, keys) -> int:
    """Drop every chunk file from the page cache; bytes still resident after."""
    paths = [tier.path_of(k.digest) for k in keys]
    for path in paths:
        drop_cache(path)
    return resident_bytes(paths)


def resident_bytes(paths) -> int:
    if shutil.which("fincore") is None:
        return -1
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                           *map(str, paths)], capture_output=True, text=True)
    return sum(int(x) for x in done.stdout.split() if x.isdigit())


def filesystem_of(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, fstype)
    return best[1]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def median_s(reps: int, fn) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn) for _ in range(reps))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def report(r: dict) -> None:
    rows = [
        ("memcpy, one numpy copyto", r["memcpy_gbps"], "", ""),
        ("memcpy, per 5.9 MB chunk", r["memcpy_chunked_gbps"], "", ""),
        ("torch copy_ (2 threads)", r["torch_copy_gbps"], "", ""),
        ("baseline: fastest copy per round", r["baseline_gbps"], "", ""),
        ("host tier put", r["host_put_gbps"], r["host_put_vs_memcpy"], ">= 0.8x memcpy"),
        ("host tier get", r["host_get_gbps"], r["host_get_vs_memcpy"], ">= 0.8x memcpy"),
        ("device tier put", r["device_put_gbps"], r["device_put_vs_memcpy"], ""),
        ("device tier get", r["device_get_gbps"], r["device_get_vs_memcpy"], ""),
        ("disk seq write, dd fdatasync", r["disk_seq_write_gbps"], "", ""),
        ("disk tier write (+flush)", r["disk_write_gbps"], r["disk_write_vs_seq"], "vs seq write"),
        ("disk seq read, dd, cold", r["disk_seq_read_gbps"], "", ""),
        ("disk tier read, cold", r["disk_read_gbps"], r["disk_read_vs_seq"], ">= 0.7x seq read"),
        ("store get from disk, cold", r["disk_get_cold_gbps"], r["disk_get_vs_seq"],
         "vs seq read"),
        ("store get from disk, no cache drop", r["disk_get_warm_gbps"], "", "O_DIRECT: disk again"),
    ]
    if "redis_put_gbps" in r:
        rows += [("redis tier put", r["redis_put_gbps"], "", "loopback"),
                 ("redis tier get (MGET)", r["redis_get_gbps"], "", "loopback")]
    print_table(f"kvstore: {r['num_chunks']} chunks x {r['chunk_bytes'] / 1e6:.2f} MB "
                f"(SmolLM2, 256 tokens), disk fs {r['filesystem']}",
                ["what", "GB/s", "ratio", "goal"], rows)
    print_table("kvstore lookups", ["what", "value", "goal"],
                [("prefix lookups, keys/s", f"{r['lookups_per_s']:,.0f}", ">= 1,000,000"),
                 ("disk bytes resident after cache drops", r["disk_resident_after_drop_bytes"],
                  "0 = reads really hit the disk")])


if __name__ == "__main__":
    main()
