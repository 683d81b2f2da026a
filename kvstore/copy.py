"""Copying chunk tensors at memcpy speed.

On CPU, torch's ``copy_`` of a strided slice (a chunk inside an
``export_blocks`` tensor) runs through an OpenMP-parallel kernel that is far
slower on busy cores than one thread (measured in docs/kvstore.md, "Tiers"). numpy's
``copyto`` on byte views coalesces the contiguous inner dimensions into
memcpy-sized runs on one thread, so CPU <-> CPU copies go through it; any
copy touching a GPU stays with torch (DMA / device kernels).

Large CPU copies that are at most 2-D in bytes (a chunk is 2 * num_layers
runs of ``chunk_tokens * H * D`` elements inside a token-range tensor, or
one contiguous row) use streaming stores (``kvstore/native/nt_copy.c``,
compiled on first use; numpy when no compiler): a pool slot is not read
again soon, and skipping the read-for-ownership of every destination line
makes the copy move 2 bytes per byte instead of 3 (glibc's ``memcpy`` uses
streaming stores only above its non-temporal threshold, far above a chunk;
measurements in docs/kvstore.md).
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.native.loader import load_nt_copy

NT_MIN_BYTES = 1 << 20
"""Below this, a copy likely stays in cache and is read soon: plain memcpy."""


def copy_kv(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` for equally shaped chunk tensors of one dtype."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype:
        if _nt_copy(dst, src):
            return
        try:
            np.copyto(_bytes(dst), _bytes(src))
            return
        except RuntimeError:  # last dimension not contiguous: no byte view
            pass
    dst.copy_(src)


def _nt_copy(dst: torch.Tensor, src: torch.Tensor) -> bool:
    nbytes = dst.numel() * dst.element_size()
    if nbytes < NT_MIN_BYTES or tuple(dst.shape) != tuple(src.shape):
        return False
    fn = load_nt_copy()
    runs = _runs_2d(dst, src) if fn is not None else None
    if runs is None:
        return False
    rows, run_bytes, dst_stride, src_stride = runs
    fn(dst.data_ptr(), dst_stride, src.data_ptr(), src_stride, run_bytes, rows)
    return True


def _runs_2d(dst: torch.Tensor, src: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(rows, run_bytes, dst_stride_bytes, src_stride_bytes)`` when both
    tensors are ``rows`` equally spaced contiguous runs; else None."""
    dims: list[list[int]] = []  # [size, dst_stride, src_stride], outer -> inner, merged
    for size, a, b in zip(dst.shape, dst.stride(), src.stride()):
        if size == 1:
            continue
        if dims and dims[-1][1] == a * size and dims[-1][2] == b * size:
            dims[-1] = [dims[-1][0] * size, a, b]
        else:
            dims.append([size, a, b])
    if not dims or dims[-1][1:] != [1, 1] or len(dims) > 2:
        return None
    item = dst.element_size()
    run = dims[-1][0] * item
    if len(dims) == 1:
        return 1, run, run, run
    rows, a, b = dims[0]
    return rows, run, a * item, b * item


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()
