"""Fault: the disk tier's filesystem fills up.

The tier's directory is a real size-limited tmpfs (``mount -t tmpfs -o
size=64k``, as root); where mounting is not permitted the test is skipped. The
writes that hit ENOSPC lose their chunk cleanly (event + ``lost`` metric), puts
never raise, nothing corrupt is served or left behind, and once the mount is
grown the tier stores again; a restarted store finds every surviving file intact.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from kvcluster.common.events import Tier
from kvstore.tiers.disk_format import HEADER_SIZE, ChunkHeader, checksum
from tests.kvstore.helpers import SPEC, build, make_keys, make_kv

NUM = 40  # 40 chunk files of 384 B; tmpfs charges a 4 KiB page each: 64 KiB holds ~15


@pytest.fixture
def small_mount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _chunk(kv, i):
    return SPEC.tokens_view(kv, i)


def _assert_files_intact(root, expected: dict[bytes, torch.Tensor]) -> int:
    """Every chunk file on disk is whole, valid and holds exactly its chunk's bytes."""
    files = list(root.glob("*.kvc"))
    for path in files:
        data = path.read_bytes()
        header = ChunkHeader.unpack(data)
        payload = data[HEADER_SIZE:]
        assert len(data) == header.file_size and checksum(payload) == header.payload_checksum
        want = expected[header.key].contiguous().view(torch.uint8).numpy().tobytes()
        assert payload == want
    assert not list(root.glob(".*.tmp"))
    return len(files)


@pytest.mark.timeout(60)
def test_full_disk_drops_chunks_cleanly_and_recovers(small_mount):
    keys, kv = make_keys(NUM), make_kv(NUM)
    by_key = {k.digest: _chunk(kv, i) for i, k in enumerate(keys)}
    store = build(host=2, disk=1000, directory=small_mount, promote=False)
    disk = store.tiers[1]
    for i in range(NUM):  # the host tier holds 2; every put spills one chunk to disk
        assert store.put([keys[i]], [_chunk(kv, i)]) == 1
        store.flush()  # one write at a time: no chunk skipped for a full writer queue
    lost = store.metrics.value("kvstore_lost_total", tier="disk", reason="io")
    on_disk = [k for k in keys if store.tier_of(k) is Tier.DISK]
    assert lost > 0, "the filesystem never filled up"
    dropped = store.metrics.value("kvstore_dropped_total")  # writer queue was full
    assert len(on_disk) + lost + dropped + 2 == NUM  # on disk, lost, skipped, or in host
    assert _assert_files_intact(disk.root, by_key) == len(on_disk)
    for i, key in enumerate(keys):  # what is found is exact; what is lost is a miss
        got = store.get([key])
        if store.tier_of(key) is None:
            assert got.shape[2] == 0
        else:
            assert torch.equal(got, kv[:, :, i * 8:(i + 1) * 8])
    # Space returns: grow the mount; new chunks land on disk again.
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_mount)], check=True)
    more_keys, more_kv = make_keys(6, seed=5), make_kv(6, seed=5)
    for i in range(6):
        store.put([more_keys[i]], [_chunk(more_kv, i)])
    store.flush()
    assert store.metrics.value("kvstore_lost_total", tier="disk", reason="io") == lost
    assert [store.tier_of(k) for k in more_keys[:4]] == [Tier.DISK] * 4
    by_key.update({k.digest: _chunk(more_kv, i) for i, k in enumerate(more_keys)})
    store.close()
    # A restart rebuilds the index from what the full disk kept: all of it intact.
    again = build(disk=1000, directory=small_mount)
    survivors = [k for k in keys + more_keys if again.tier_of(k) is Tier.DISK]
    assert len(survivors) == _assert_files_intact(again.tiers[0].root, by_key)
    for key in survivors:
        assert torch.equal(again.get([key]), by_key[key.digest])
    again.close()
