"""Per-thread scratch buffers: big float32 work tensors reused across calls.

A fresh 50 MB tensor costs more in page faults than the arithmetic done in it
(an int8 -> float32 cast into a new tensor is many times slower than into a
reused one: docs/codec.md, "Measurements behind the code"), so the codecs work
in place in these. Callers never hand a scratch tensor out of the codec.
"""

from __future__ import annotations

import math
import threading

import torch

_LOCAL = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, reused by later calls with the same name."""
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        buffers[(name, dtype)] = buf
    return buf[:numel].view(shape)


def release() -> None:
    """Drop this thread's buffers (tests, or after a one-off huge chunk)."""
    _LOCAL.__dict__.pop("buffers", None)
