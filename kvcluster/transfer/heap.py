"""Keep freed message buffers warm: glibc heap thresholds for bulk KV streams.

Every gRPC message reaches Python as a fresh ``bytes`` of about
``message_payload_bytes`` (and is built as one on the sending side). With
glibc's defaults a buffer that size is served by a fresh ``mmap`` (above the
dynamic mmap threshold) or from heap memory that was handed back to the kernel
when the previous message was freed (the 128 KiB trim threshold), so each
message is copied into pages the kernel must first fault in and zero, far slower
than into warm pages (docs/kvstore.md, "Tiers"). In a profile of
``bench/transfer.py`` page clearing was the receiver's largest single cost
(docs/benchmarks.md, transfer). Raising both thresholds
lets the next message reuse the memory the last one freed.

The cost is resident memory: up to ``trim_threshold_bytes`` of free heap stays
mapped after a burst. Process-wide and idempotent; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc refuses a larger mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)."""


@functools.lru_cache(maxsize=None)
def keep_heap_warm(trim_threshold_bytes: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if applied."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    applied = (mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD_BYTES) == 1
               and mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1)
    if not applied:
        log.info("mallopt refused the KV stream heap thresholds; keeping glibc defaults")
    return applied


def _mallopt():
    name = ctypes.util.find_library("c")
    if name is None or "libc.so" not in name:
        return None
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
