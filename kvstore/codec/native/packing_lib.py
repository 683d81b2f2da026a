"""Load ``packing.c`` (symbol packing in column groups), compiled once per machine.

Without a compiler, off x86-64, or with ``KVSTORE_CODEC_NATIVE=0``,
:func:`available` is False and kvstore/codec/packing.py keeps its numpy twin,
which gives the same bytes (tests/codec/test_packing_native.py).

The wrappers take numpy arrays and check what C relies on (dtype, contiguity,
buffer sizes); C checks sizes again and never reads or writes past them.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from kvcluster.native import load_library
from kvstore.codec.native import DISABLE_ENV

SOURCE = Path(__file__).with_name("packing.c")
FLAGS = ("-O3", "-march=native")
ERR_ESCAPES, ERR_ARGS = -1, -2


def available() -> bool:
    return _lib() is not None


def escape_counts(rows: np.ndarray) -> np.ndarray:
    """Per column of ``rows [R, C]`` int8: symbols with ``|s| > 1`` and ``|s| > 7``
    (escapes at widths 2 and 4), int64 ``[2, C]``."""
    _check(rows, np.int8, 2)
    counts = np.empty((2, rows.shape[1]), dtype=np.int64)
    status = _lib().kv_count_escapes(_ptr(rows), *rows.shape, _ptr(counts[0]), _ptr(counts[1]))
    assert status == 0, status
    return counts


def pack_group(rows: np.ndarray, start: int, end: int, width: int, packed: np.ndarray,
               escapes: np.ndarray) -> int:
    """Columns ``[start, end)`` of ``rows [R, C]`` int8 packed at ``width`` into ``packed``
    (uint8, exactly its size) and the front of ``escapes`` (int8); returns the escapes
    written, or ERR_ESCAPES when ``escapes`` is too short for them."""
    _check(rows, np.int8, 2)
    _check(packed, np.uint8, 1)
    _check(escapes, np.int8, 1)
    count = _lib().kv_pack_group(_ptr(rows), *rows.shape, start, end, width, _ptr(packed),
                                 packed.size, _ptr(escapes), escapes.size)
    assert count != ERR_ARGS, (rows.shape, start, end, width, packed.size)
    return count


def unpack_group(packed: np.ndarray, escapes: np.ndarray, width: int, rows: np.ndarray,
                 start: int, end: int) -> int:
    """Inverse of :func:`pack_group` into columns ``[start, end)`` of ``rows [R, C]``
    int8, taking escape values from the front of ``escapes``; returns how many it
    took, or ERR_ESCAPES when the escape codes outnumber them."""
    _check(packed, np.uint8, 1)
    _check(escapes, np.int8, 1)
    _check(rows, np.int8, 2)
    used = _lib().kv_unpack_group(_ptr(packed), packed.size, _ptr(escapes), escapes.size, width,
                                  _ptr(rows), *rows.shape, start, end)
    assert used != ERR_ARGS, (rows.shape, start, end, width, packed.size)
    return used


def _check(array: np.ndarray, dtype, ndim: int) -> None:
    assert array.dtype == dtype and array.ndim == ndim and array.flags.c_contiguous, (
        array.dtype, array.shape, array.strides)


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, FLAGS, DISABLE_ENV)
    if lib is None:
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.kv_count_escapes.restype = n
    lib.kv_count_escapes.argtypes = [p, n, n, p, p]
    lib.kv_pack_group.restype = n
    lib.kv_pack_group.argtypes = [p, n, n, n, n, ctypes.c_int, p, n, p, n]
    lib.kv_unpack_group.restype = n
    lib.kv_unpack_group.argtypes = [p, n, p, n, ctypes.c_int, p, n, n, n, n]
    return lib
