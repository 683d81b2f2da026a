"""Load ``nt_copy.c``, compiled once per machine (see :mod:`kvcluster.native`).

Without a compiler, on a non-x86-64 CPU, or with ``KVSTORE_NATIVE_COPY=0``,
:func:`load_nt_copy` returns None and callers fall back to numpy.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from kvcluster.native import load_library

SOURCE = Path(__file__).with_name("nt_copy.c")


@functools.cache
def load_nt_copy():
    """The C function ``kv_nt_copy_2d`` (see nt_copy.c), or None."""
    lib = load_library(SOURCE, ("-O2",), "KVSTORE_NATIVE_COPY")
    if lib is None:
        return None
    fn = lib.kv_nt_copy_2d
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_ssize_t,
                   ctypes.c_size_t, ctypes.c_size_t]
    return fn
