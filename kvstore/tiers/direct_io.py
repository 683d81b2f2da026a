"""Reading whole chunk files with O_DIRECT into huge-page-backed buffers.

Why: a buffered read of a fresh file starts a new readahead stream with small
page-cache folios, so the block layer sends small requests whatever the number
of files in flight. An ``O_DIRECT`` read into a buffer that is 2 MiB-aligned
private anonymous memory (transparent huge pages) gives the block layer
physically contiguous 2 MiB segments: requests several times larger, then one
memcpy into the destination (request sizes and speeds measured on this VM's
virtio disk: docs/kvstore.md, "Disk tier").

    buffer: uint8 [round_up(file bytes, 2 MiB)]   mmap'd once, 2 MiB aligned,
                                                  MADV_HUGEPAGE, touched
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

HUGE_PAGE = 2 << 20
DIRECT_ALIGN = 4096
"""Offset/length/address alignment used for O_DIRECT (>= any logical block)."""


class AlignedBuffer:
    """A preallocated, 2 MiB-aligned, touched buffer of ``nbytes`` (no allocation per read)."""

    def __init__(self, nbytes: int):
        size = _round_up(nbytes, HUGE_PAGE)
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        start = (-address) % HUGE_PAGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE, start, size)
        self.view = memoryview(self._map)[start : start + size]
        """Writable bytes, 2 MiB aligned."""
        for offset in range(0, size, mmap.PAGESIZE):  # fault every page in now
            self.view[offset] = 0


def open_for_read(path) -> tuple[int, bool]:
    """``(fd, direct)``: O_DIRECT when the filesystem supports it, else buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_RDONLY), False


def read_whole(fd: int, direct: bool, file_bytes: int, buf: memoryview) -> int:
    """Read the first ``file_bytes`` of ``fd`` into ``buf``; bytes read.

    With ``direct`` the request is rounded up to :data:`DIRECT_ALIGN` (the
    read stops at end of file); if the kernel refuses the alignment
    (EINVAL) it retries buffered.
    """
    want = _round_up(file_bytes, DIRECT_ALIGN) if direct else file_bytes
    if want > len(buf):
        raise ValueError(f"file of {file_bytes} bytes does not fit a {len(buf)}-byte buffer")
    try:
        return _read_all(fd, buf[:want])
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        _drop_direct(fd)
        return _read_all(fd, buf[:file_bytes])


def _read_all(fd: int, view: memoryview) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], done)
        if n <= 0:
            break
        done += n
    return done


def _drop_direct(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align
