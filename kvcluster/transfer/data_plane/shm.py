"""The shm data plane: both ends on one node, payloads through shared memory, one copy.

The receiver's windows are files in ``/dev/shm`` (mode 0600, random names)
mapped by both processes; the sender copies a chunk's bytes in (one
``memcpy``, off the event loop, GIL released) and the receiver decodes
straight from the mapping. No socket, no kernel copy, no second user copy.

Writes are one-sided: the receiver cannot stop a sender that is late (stopped
mid-copy, say). So a window whose transfer did not end cleanly is never lent
again: its file is unlinked and the mapping dropped, and a late copy lands in
memory nobody reads. Segments left by a receiver that died are removed by the
next receiver on the node (their names carry the creator's pid).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import re
import secrets
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from kvcluster.transfer.data_plane.base import (
    DataLink, DataPlaneError, ReceiverPlane, SenderPlane, Window, WriteRange, check_range,
    check_ranges,
)
from kvcluster.transfer.data_plane.window_pool import WindowPool
from kvcluster.transfer.messages import DataPlaneGrant, DataPlaneOffer, StreamHeader

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"kvdp-(\d+)-[0-9a-f]{16}")
MAX_MAPPINGS = 16
"""Segments a sender keeps mapped (receivers it talks to x their windows)."""


class Segment:
    """One shared-memory file, mapped."""

    def __init__(self, name: str, size: int, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(SHM_DIR / name, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | flags_populate())
        finally:
            os.close(fd)
        self.name, self.size = name, size
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        if create:
            self.array[::mmap.PAGESIZE] = 0  # allocate every page now, not on the first chunk

    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new segment; OSError when /dev/shm cannot hold it (a container's is often
        64 MiB: touching pages past its limit would kill the process with SIGBUS)."""
        stats = os.statvfs(SHM_DIR)
        if size > stats.f_bavail * stats.f_frsize:
            raise OSError(f"{SHM_DIR} has {stats.f_bavail * stats.f_frsize} bytes free, "
                          f"a window needs {size}")
        return cls(f"kvdp-{os.getpid()}-{secrets.token_hex(8)}", size, create=True)

    def destroy(self) -> None:
        """Unlink the file; the memory goes once the last mapping is dropped."""
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass
        self.array = None


class ShmReceiverPlane(ReceiverPlane):
    name = "shm"

    def __init__(self, budget_bytes: int):
        self.pool = WindowPool(Segment.create, Segment.destroy, lambda s: s.size, budget_bytes)
        self._closed = False
        self.retired = 0

    async def start(self) -> None:
        remove_stale_segments()

    async def stop(self) -> None:
        self._closed = True
        self.pool.close()

    def unavailable(self, offer: DataPlaneOffer, node_id: str) -> str:
        if not offer.node_id or offer.node_id != node_id:
            return "the sender is on another node"
        if not SHM_DIR.is_dir():
            return f"no {SHM_DIR} here"
        return ""

    def open(self, header: StreamHeader, window_bytes: int) -> Window | None:
        try:
            segment = self.pool.take(window_bytes)
        except OSError as exc:
            log.warning("shm data plane: no window (%s); this transfer goes inline", exc)
            return None
        if segment is None:
            return None
        return ShmWindow(self, segment, DataPlaneGrant(
            "shm", b"", segment.size, segment=segment.name, reason="same node"))

    def stats(self) -> dict:
        return {"registered_bytes": self.pool.registered_bytes, "retired_windows": self.retired}


class ShmWindow(Window):
    def __init__(self, plane: ShmReceiverPlane, segment: Segment, grant: DataPlaneGrant):
        self.plane, self.segment, self.grant = plane, segment, grant
        self._view = memoryview(segment.array)

    @property
    def size(self) -> int:
        return self.segment.size

    def view(self, offset: int, length: int) -> memoryview:
        check_range(offset, length, self.size)
        return self._view[offset:offset + length]

    def close(self, clean: bool) -> None:
        reuse = clean and not self.plane._closed
        if not reuse:
            self.plane.retired += 1
        self._view = None
        self.plane.pool.give(self.segment, reuse=reuse)


class ShmSenderPlane(SenderPlane):
    name = "shm"

    def __init__(self, copy_threads: int = 2):
        self.executor = ThreadPoolExecutor(copy_threads, thread_name_prefix="kv-dp-shm")
        self._mapped: OrderedDict[str, Segment] = OrderedDict()

    def link(self, grant: DataPlaneGrant, target_host: str) -> DataLink:
        if not _NAME.fullmatch(grant.segment):
            raise DataPlaneError(f"not a data plane segment name: {grant.segment!r}")
        segment = self._mapped.pop(grant.segment, None) or self._attach(grant.segment)
        self._mapped[grant.segment] = segment
        while len(self._mapped) > MAX_MAPPINGS:
            self._mapped.popitem(last=False)
        if segment.size < grant.window_bytes:
            raise DataPlaneError(f"segment {grant.segment} has {segment.size} bytes, "
                                 f"the grant says {grant.window_bytes}")
        return ShmLink(grant, segment.array, self.executor)

    async def close(self) -> None:
        self._mapped.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _attach(self, name: str) -> Segment:
        try:
            return Segment(name, 0, create=False)
        except OSError as exc:
            raise DataPlaneError(f"cannot map shared memory {name} ({exc}): the receiver "
                                 "is not on this host, or not in this /dev/shm") from exc


class ShmLink(DataLink):
    def __init__(self, grant: DataPlaneGrant, array: np.ndarray, executor: ThreadPoolExecutor):
        super().__init__(grant)
        self.array, self.executor = array, executor

    async def write(self, ranges: Sequence[WriteRange], write_id: int) -> None:
        check_ranges(ranges, self.window_bytes)
        await asyncio.get_running_loop().run_in_executor(self.executor, _copy, self.array,
                                                         ranges)


def _copy(array: np.ndarray, ranges: Sequence[WriteRange]) -> None:
    for r in ranges:
        source = np.frombuffer(r.local, dtype=np.uint8)
        np.copyto(array[r.remote_offset:r.remote_offset + len(source)], source)


def flags_populate() -> int:
    """MAP_POPULATE where the platform has it: map every page at once."""
    return getattr(mmap, "MAP_POPULATE", 0)


def remove_stale_segments() -> int:
    """Unlink segments whose creating process is gone; returns how many."""
    removed = 0
    if not SHM_DIR.is_dir():
        return 0
    for path in SHM_DIR.glob("kvdp-*"):
        match = _NAME.fullmatch(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
