"""Disk tier: crash safety with a really killed writer, corruption, restart,
compression, in-flight reads and the bounded writer queue."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvcluster.common.events import BlockRemoved, Tier
from kvstore.tiers.disk_format import HEADER_SIZE, ChunkHeader
from tests.kvstore.helpers import CHUNK, DISK_CHUNK, SPEC, build, make_keys, make_kv

REPO = Path(__file__).resolve().parents[2]

WRITER_SCRIPT = """
import sys, time
from tests.kvstore.helpers import SPEC, build, make_keys, make_kv
store = build(disk=10, directory=sys.argv[1])
keys, kv = make_keys(4), make_kv(4)
store.put(keys[:3], kv[:, :, :24])
store.flush()
def pause(tmp):
    print("PAUSED", tmp, flush=True)
    time.sleep(600)
store.tiers[0].after_partial_write = pause
store.put(keys[3:], [SPEC.tokens_view(kv, 3)])
time.sleep(600)
"""


def chunk(kv, i):
    return SPEC.tokens_view(kv, i)


def test_killed_writer_leaves_partial_file_that_restart_ignores(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PAUSED"), line
        tmp = Path(line.split()[1])
        assert tmp.exists() and HEADER_SIZE < tmp.stat().st_size < DISK_CHUNK  # mid-file
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stdout.close()
    keys, kv = make_keys(4), make_kv(4)
    store = build(disk=10, directory=tmp_path)  # the dead process's flock is gone
    assert not tmp.exists()
    assert store.lookup(keys).tiers == [Tier.DISK] * 3
    assert torch.equal(store.get(keys), kv[:, :, :24])
    (snapshot,) = store.snapshot_events()
    assert snapshot.tier == Tier.DISK
    assert sorted(snapshot.block_hashes) == sorted(k.u64 for k in keys[:3])
    store.close()


def test_flipped_payload_byte_is_detected_and_not_served(tmp_path):
    store = build(disk=10, directory=tmp_path)
    events = []
    store.on_event.append(events.append)
    keys, kv = make_keys(3), make_kv(3)
    store.put(keys, kv)
    store.flush()
    path = store.tiers[0].path_of(keys[1].digest)
    _flip(path, HEADER_SIZE + 100)
    got = store.get(keys)
    assert torch.equal(got, kv[:, :, :8])  # only the chunk before the corrupt one
    assert not path.exists() and store.tier_of(keys[1]) is None
    assert events[-1] == BlockRemoved((keys[1].u64,), Tier.DISK)
    assert store.metrics.value("kvstore_lost_total", tier="disk", reason="corrupt") == 1
    assert torch.equal(store.get(keys[2:]), kv[:, :, 16:])  # others still fine
    store.close()


def test_flipped_header_byte_is_detected(tmp_path):
    store = build(disk=10, directory=tmp_path)
    keys, kv = make_keys(1), make_kv(1)
    store.put(keys, kv)
    store.flush()
    _flip(store.tiers[0].path_of(keys[0].digest), 20)
    assert store.get(keys).shape[2] == 0
    store.close()


def test_verify_on_start_discards_corrupt_payload(tmp_path):
    store = build(disk=10, directory=tmp_path)
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)
    store.flush()
    _flip(store.tiers[0].path_of(keys[0].digest), HEADER_SIZE + 3)
    store.close()
    store = build(disk=10, directory=tmp_path, verify_on_start=True)
    assert store.lookup(keys[1:]).num_chunks == 1 and store.tier_of(keys[0]) is None
    store.close()


def test_restart_rebuilds_index_and_drops_bad_files(tmp_path):
    store = build(disk=10, directory=tmp_path)
    keys, kv = make_keys(4), make_kv(4)
    store.put(keys, kv)
    store.flush()
    root = store.tiers[0].root
    store.close()
    for i, key in enumerate(keys):  # deterministic age order: keys[0] oldest
        os.utime(root / f"{key.hex()}.kvc", (1000 + i, 1000 + i))
    truncated = root / f"{make_keys(1, seed=9)[0].hex()}.kvc"
    truncated.write_bytes((root / f"{keys[0].hex()}.kvc").read_bytes()[:200])
    (root / "not-hex.kvc").write_bytes(b"junk")
    (root / ".abc.1.0.tmp").write_bytes(b"partial")
    store = build(disk=10, directory=tmp_path)
    assert torch.equal(store.get(keys), kv)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".lock"] + [f"{k.hex()}.kvc" for k in keys])
    store.close()
    store = build(disk=2, directory=tmp_path)  # smaller now: the two newest stay
    assert [store.tier_of(k) for k in keys] == [None, None, Tier.DISK, Tier.DISK]
    assert store.tiers[0].used_bytes == 2 * DISK_CHUNK
    store.close()


def test_zstd_at_rest_roundtrip(tmp_path):
    store = build(disk=10, directory=tmp_path, compression="zstd")
    keys = make_keys(2)
    kv = torch.zeros(SPEC.layout.shape(16), dtype=torch.float16)
    kv[:, :, 8:] = make_kv(1)  # chunk 1 is random: stays raw
    store.put(keys, kv)
    store.flush()
    disk = store.tiers[0]
    small, raw = (disk.path_of(k.digest).stat().st_size for k in keys)
    assert small < HEADER_SIZE + CHUNK // 4 and raw == DISK_CHUNK
    assert disk.used_bytes == small + raw
    store.close()
    store = build(disk=10, directory=tmp_path, compression="zstd")
    assert torch.equal(store.get(keys), kv)
    header = ChunkHeader.unpack(store.tiers[0].path_of(keys[0].digest).read_bytes())
    assert header.compressed and header.raw_len == CHUNK
    store.close()


def test_get_while_spill_in_flight_returns_exact_bytes(tmp_path):
    store = build(host=1, disk=10, directory=tmp_path, promote=False)
    disk = store.tiers[1]
    entered, release = threading.Event(), threading.Event()
    disk.after_partial_write = lambda tmp: (entered.set(), release.wait(10))
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys[:1], [chunk(kv, 0)])
    store.put(keys[1:], [chunk(kv, 1)])  # k0 spills; the writer pauses mid-file
    assert entered.wait(10)
    assert disk.is_pending(keys[0].digest)
    assert torch.equal(store.get(keys[:1]), kv[:, :, :8])
    release.set()
    store.flush()
    assert not disk.is_pending(keys[0].digest)
    assert torch.equal(store.get(keys), kv)
    store.close()


def test_promotion_cancels_in_flight_write(tmp_path):
    store = build(host=1, disk=10, directory=tmp_path)
    disk = store.tiers[1]
    entered, release = threading.Event(), threading.Event()
    disk.after_partial_write = lambda tmp: (entered.set(), release.wait(10))
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)  # k0 spills to disk, writer paused
    assert entered.wait(10)
    assert torch.equal(store.get(keys[:1]), kv[:, :, :8])  # promoted back; k1 spills
    assert store.lookup(keys).tiers == [Tier.HOST, Tier.DISK]
    release.set()
    disk.after_partial_write = None
    store.flush()
    names = sorted(p.name for p in disk.root.iterdir())
    assert names == sorted([".lock", f"{keys[1].hex()}.kvc"])
    assert torch.equal(store.get(keys[1:]), kv[:, :, 8:])
    store.close()


def test_full_writer_queue_never_blocks_the_caller(tmp_path):
    store = build(host=1, disk=10, directory=tmp_path, max_pending_writes=1)
    disk = store.tiers[1]
    release = threading.Event()
    disk.after_partial_write = lambda tmp: release.wait(10)
    keys, kv = make_keys(3), make_kv(3)
    start = time.monotonic()
    for i in range(3):
        store.put([keys[i]], [chunk(kv, i)])
    assert time.monotonic() - start < 5
    # k0 took the only staging row; k1 found the queue full and was dropped.
    assert [store.tier_of(k) for k in keys] == [Tier.DISK, None, Tier.HOST]
    assert store.metrics.value("kvstore_dropped_total") == 1
    assert store.metrics.value("kvstore_skipped_total", tier="disk") == 1
    release.set()
    store.close()


def test_one_store_per_directory(tmp_path):
    store = build(disk=2, directory=tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        build(disk=2, directory=tmp_path)
    store.close()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_failed_write_loses_the_chunk_cleanly(tmp_path):
    store = build(disk=10, directory=tmp_path, max_pending_writes=1)
    disk = store.tiers[0]
    events = []
    store.on_event.append(events.append)

    def disk_full(tmp):
        raise OSError(28, "No space left on device")

    disk.after_partial_write = disk_full
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys[:1], [chunk(kv, 0)])
    store.flush()
    assert store.tier_of(keys[0]) is None and disk.used_bytes == 0
    assert events[-1] == BlockRemoved((keys[0].u64,), Tier.DISK)
    assert store.metrics.value("kvstore_lost_total", tier="disk", reason="io") == 1
    assert list(disk.root.glob("*.tmp")) == [] and list(disk.root.glob(".*.tmp")) == []
    disk.after_partial_write = None
    assert store.put(keys[1:], [chunk(kv, 1)]) == 1  # the staging row was freed
    store.flush()
    assert torch.equal(store.get(keys[1:]), kv[:, :, 8:])
    store.close()


def test_concurrent_reads_stop_at_a_corrupt_file_mid_prefix(tmp_path):
    store = build(disk=10, directory=tmp_path, reader_threads=3)
    tier = store.tiers[0]
    keys, kv = make_keys(5), make_kv(5)
    store.put(keys, kv)
    store.flush()
    _flip(tier.path_of(keys[2].digest), HEADER_SIZE + 7)
    dsts = [torch.zeros(SPEC.shape, dtype=SPEC.dtype) for _ in keys]
    assert tier.read_many([k.digest for k in keys], dsts) == [True, True, False, False, False]
    assert all(torch.equal(dsts[i], chunk(kv, i)) for i in (0, 1))
    assert not tier.path_of(keys[2].digest).exists() and keys[2].digest not in tier
    assert keys[3].digest in tier  # read fine, only not served past the gap
    assert torch.equal(store.get(keys[3:]), kv[:, :, 24:])
    store.close()


def test_reads_use_o_direct_and_reject_oversized_files(tmp_path):
    from kvstore.tiers.direct_io import HUGE_PAGE, AlignedBuffer, open_for_read

    buf = AlignedBuffer(5000)
    assert len(buf.view) == HUGE_PAGE
    assert torch.frombuffer(buf.view, dtype=torch.uint8).data_ptr() % HUGE_PAGE == 0
    store = build(disk=10, directory=tmp_path)
    tier = store.tiers[0]
    keys, kv = make_keys(2), make_kv(2)
    store.put(keys, kv)
    store.flush()
    fd, direct = open_for_read(tier.path_of(keys[0].digest))
    os.close(fd)
    if hasattr(os, "O_DIRECT") and not direct:
        pytest.skip("filesystem without O_DIRECT: the buffered path is covered by the rest")
    assert torch.equal(store.get(keys), kv)  # exact through the direct path
    with open(tier.path_of(keys[1].digest), "ab") as f:
        f.write(b"\0" * 4096)  # longer than any chunk file
    assert store.get(keys).shape[2] == SPEC.chunk_tokens
    assert store.metrics.value("kvstore_lost_total", tier="disk", reason="corrupt") == 1
    store.close()
