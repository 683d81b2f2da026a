"""Turning tensors into stream sections and back, with every size checked first."""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import zstandard

from kvstore.codec.base import CodecError

_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.uint8: np.uint8,
          torch.int8: np.int8, torch.int16: np.int16}


def tensor_section(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (no copy when it is contiguous)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def read_tensor(section: memoryview, dtype: torch.dtype, shape: tuple[int, ...],
                what: str) -> torch.Tensor:
    """A tensor of ``shape`` from a section that must be exactly that size."""
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    itemsize = np.dtype(_NUMPY[raw_dtype]).itemsize
    want = math.prod(shape) * itemsize
    if len(section) != want:
        raise CodecError(f"{what}: section holds {len(section)} bytes, expected {want}")
    array = np.frombuffer(section, dtype=_NUMPY[raw_dtype]).reshape(shape)
    t = torch.from_numpy(array.copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


SYMBOL_PARAMS = dict(window_log=17, hash_log=10, chain_log=10, search_log=1, min_match=7,
                     strategy=1)
"""zstd tuned for quantized symbols: the fast strategy with 7-byte minimum matches.

On SmolLM2 KV symbols both smaller and faster than level 1, whose short matches
cost more bits than the literals they replace (docs/codec.md, "Measurements behind the code").
"""


def compress(data: memoryview | bytes, level: int | None = None) -> bytes:
    """One zstd frame with its content size recorded (checked on decode).

    ``level`` None uses :data:`SYMBOL_PARAMS`; an int is a plain zstd level.
    """
    cache = _LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = _compressor(level)
    return cache[level].compress(data)


def decompress(section: memoryview, expected_size: int, what: str,
               at_most: bool = False) -> memoryview:
    """Inflate one zstd frame that must hold exactly (or ``at_most``) ``expected_size`` bytes."""
    try:
        declared = zstandard.frame_content_size(section)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: not a zstd frame ({exc})") from exc
    if at_most and 0 <= declared <= expected_size:
        expected_size = declared
    if declared != expected_size:
        raise CodecError(f"{what}: frame declares {declared} bytes, expected {expected_size}")
    try:
        out = _decompressor().decompress(section, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{what}: corrupt zstd frame ({exc})") from exc
    if len(out) != expected_size:
        raise CodecError(f"{what}: inflated to {len(out)} bytes, expected {expected_size}")
    return memoryview(out)


_LOCAL = threading.local()  # zstd contexts are reusable but not shareable across threads


def _compressor(level: int | None) -> zstandard.ZstdCompressor:
    if level is not None:
        return zstandard.ZstdCompressor(level=level, write_content_size=True)
    params = zstandard.ZstdCompressionParameters(**SYMBOL_PARAMS, write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params)


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "decompressor"):
        _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _LOCAL.decompressor
