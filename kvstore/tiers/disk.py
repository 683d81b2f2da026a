"""Disk tier: one crash-safe file per chunk in a local directory (an SSD).

Writes never block the caller: ``write`` copies the chunk into one of
``max_pending_writes`` preallocated staging rows and queues it; background
writer threads compress (optional zstd), checksum, write a temp file, fsync
it and rename it into place. Several writers keep several fsyncs in flight
(faster than one; measured in docs/kvstore.md, "Disk tier"); each job has its
own temp file and a cancelled job never renames, so their order is free. When
every staging row is busy the tier is not
``accepting()``: a spill goes past it instead of waiting. A get while the
write is still queued is served from the staging row.

On start the index is rebuilt from the directory: temp files (a writer that
died mid-file) are deleted, files whose header, length or key do not check
out are deleted, and the survivors are charged oldest first. Payload
checksums are checked on every read; a corrupt chunk is deleted and reported
lost, never served. Reads: one O_DIRECT read of the whole file into a
huge-page bounce buffer per reader thread, checked, then copied out
(:mod:`kvstore.tiers.direct_io` says why). One file's reading and writing:
:mod:`kvstore.tiers.disk_files`; its format: :mod:`kvstore.tiers.disk_format`.

Layout: ``DIRECTORY/<layout identity>-T<chunk_tokens>/<key hex>.kvc``;
one store per directory (enforced with an exclusive ``flock``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import zstandard

from kvcluster.common.events import Tier
from kvcluster.common.names import DISK_COMPRESSIONS
from kvstore.chunk_spec import ChunkSpec
from kvstore.copy import copy_kv
from kvstore.policy import EvictionPolicy
from kvstore.tiers.base import StorageTier
from kvstore.tiers.disk_files import (
    ReadBuffers, check_header, encode_chunk, fsync_dir, lock_directory, read_chunk_file,
    write_chunk_file,
)
from kvstore.tiers.disk_format import HEADER_SIZE, ChunkHeader, CorruptChunk, checksum

log = logging.getLogger(__name__)


@dataclass
class _PendingWrite:
    key: bytes
    slot: int
    """Staging row holding the chunk until the file is in place."""
    cancelled: bool = False


class DiskTier(StorageTier):
    kind = Tier.DISK

    def __init__(
        self,
        spec: ChunkSpec,
        capacity_bytes: int,
        policy: EvictionPolicy,
        lock: threading.RLock | None = None,
        *,
        directory: str | Path,
        compression: str = "none",
        max_pending_writes: int = 16,
        writer_threads: int = 4,
        reader_threads: int = 4,
        verify_on_start: bool = False,
    ):
        super().__init__(spec, capacity_bytes, policy, lock)
        if compression not in DISK_COMPRESSIONS:
            raise ValueError(f"disk compression must be one of {list(DISK_COMPRESSIONS)}, "
                             f"got {compression!r}")
        self.root = Path(directory) / f"{spec.layout.identity}-T{spec.chunk_tokens}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = lock_directory(self.root)
        self.compression = compression
        self._staging = torch.zeros((max_pending_writes, spec.chunk_bytes), dtype=torch.uint8)
        self._free_staging = list(range(max_pending_writes - 1, -1, -1))
        self._pending: dict[bytes, _PendingWrite] = {}
        self._read_bufs: queue.SimpleQueue[ReadBuffers] = queue.SimpleQueue()
        for _ in range(reader_threads):
            self._read_bufs.put(ReadBuffers(spec.chunk_bytes))
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="kvstore-disk-reader")
        self._queue: queue.Queue[_PendingWrite | None] = queue.Queue()
        self.after_partial_write: Callable[[Path], None] | None = None
        """Test hook: called after half of a payload is in the temp file."""
        self._rebuild_index(verify_on_start)
        self._writers = [threading.Thread(target=self._write_loop, name=f"kvstore-disk-writer-{i}",
                                          daemon=True) for i in range(writer_threads)]
        for writer in self._writers:
            writer.start()

    # ---------------------------------------------------------- public

    def accepting(self) -> bool:
        return bool(self._free_staging)

    def charge_per_chunk(self) -> int:
        return HEADER_SIZE + self.spec.chunk_bytes

    def path_of(self, key: bytes) -> Path:
        return self.root / f"{key.hex()}.kvc"

    def is_pending(self, key: bytes) -> bool:
        return key in self._pending

    def write(self, key: bytes, src: torch.Tensor, tenant: str = "") -> bool:
        slot = self._free_staging.pop()
        copy_kv(self.spec.typed(self._staging[slot]), src)
        job = _PendingWrite(key, slot)
        self._pending[key] = job
        self._charge(key, self.charge_per_chunk())
        self._queue.put(job)
        return True

    def read_into(self, key: bytes, dst: torch.Tensor) -> bool:
        return self.read_many([key], [dst])[0]

    def read_many(self, keys: list[bytes], dsts: list[torch.Tensor]) -> list[bool]:
        """Read chunks, files concurrently on the reader threads."""
        started = [self._start_read(k, d) for k, d in zip(keys, dsts)]
        oks = [s if isinstance(s, bool) else self._finish_read(k, s)
               for k, s in zip(keys, started)]
        good = oks.index(False) if False in oks else len(oks)
        return [True] * good + [False] * (len(oks) - good)

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        alive = [w for w in self._writers if w.is_alive()]
        for _ in alive:
            self._queue.put(None)
        for writer in alive:
            writer.join()
        self._dir_lock.close()

    # ---------------------------------------------------------- reads

    def _start_read(self, key: bytes, dst: torch.Tensor) -> bool | Future:
        job = self._pending.get(key)
        if job is not None:  # still queued or being written: staging is exact
            copy_kv(dst, self.spec.typed(self._staging[job.slot]))
            return True
        if key not in self._charged:
            return False
        return self._readers.submit(self._read_file, key, dst)

    def _finish_read(self, key: bytes, future: Future) -> bool:
        try:
            future.result()
            return True
        except (OSError, CorruptChunk) as exc:
            log.warning("disk tier: dropping chunk %s: %s", key.hex()[:16], exc)
            self._lose([key], "corrupt" if isinstance(exc, CorruptChunk) else "io")
            return False

    def _read_file(self, key: bytes, dst: torch.Tensor) -> None:
        """Runs on a reader thread; touches no shared state but its buffers."""
        bufs = self._read_bufs.get()
        try:
            read_chunk_file(self.spec, self.path_of(key), key, dst, bufs)
        finally:
            self._read_bufs.put(bufs)

    # ---------------------------------------------------------- writes

    def _write_loop(self) -> None:
        compressor = zstandard.ZstdCompressor(level=3) if self.compression == "zstd" else None
        while (job := self._queue.get()) is not None:
            try:
                self._write_job(job, compressor)
            except Exception:  # never kill the writer thread
                log.exception("disk tier: write of %s failed", job.key.hex()[:16])
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write_job(self, job: _PendingWrite, compressor: zstandard.ZstdCompressor | None) -> None:
        with self.lock:
            if job.cancelled:
                self._free_staging.append(job.slot)
                return
        tmp = self.root / f".{job.key.hex()}.{os.getpid()}.{job.slot}.tmp"
        try:
            header, payload = encode_chunk(self.spec, job.key, self._staging[job.slot].numpy(),
                                           compressor)
            write_chunk_file(tmp, header.pack(), payload, self.after_partial_write)
        except Exception as exc:  # disk full, I/O error, ...: the chunk is lost
            tmp.unlink(missing_ok=True)
            self._finish(job, None, tmp, error=exc)
            return
        self._finish(job, header, tmp)
        if self._queue.empty():  # make the renames durable once per burst
            fsync_dir(self.root)

    def _finish(self, job: _PendingWrite, header: ChunkHeader | None, tmp: Path,
                error: Exception | None = None) -> None:
        with self.lock:
            self._free_staging.append(job.slot)
            if job.cancelled:
                tmp.unlink(missing_ok=True)
                return
            del self._pending[job.key]
            if error is not None:
                log.warning("disk tier: write of %s failed: %s", job.key.hex()[:16], error)
                self._lose([job.key], "io")
                return
            os.replace(tmp, self.path_of(job.key))
            self._recharge(job.key, header.file_size)

    def _discard(self, key: bytes) -> None:
        job = self._pending.pop(key, None)
        if job is not None:
            job.cancelled = True  # the writer frees its staging row
        else:
            self.path_of(key).unlink(missing_ok=True)

    # ---------------------------------------------------------- start-up

    def _rebuild_index(self, verify: bool) -> None:
        for tmp in self.root.glob(".*.tmp"):
            log.info("disk tier: removing partial file %s", tmp.name)
            tmp.unlink(missing_ok=True)
        found = []
        for path in self.root.glob("*.kvc"):
            try:
                found.append(self._scan(path, verify))
            except (OSError, ValueError) as exc:  # CorruptChunk is a ValueError
                log.warning("disk tier: discarding %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        for _mtime, key, size in sorted(found):
            while self.used_bytes + size > self.capacity_bytes and len(self):
                self.delete(self.policy.pop_victim(lambda _k: False))
            if size <= self.capacity_bytes:
                self._charge(key, size)

    def _scan(self, path: Path, verify: bool) -> tuple[float, bytes, int]:
        key = bytes.fromhex(path.stem)
        with open(path, "rb") as f:
            header = ChunkHeader.unpack(f.read(HEADER_SIZE))
            stat = os.fstat(f.fileno())
            check_header(self.spec, header, key, stat.st_size)
            if verify and checksum(f.read()) != header.payload_checksum:
                raise CorruptChunk("payload checksum mismatch")
        return stat.st_mtime, key, header.file_size
