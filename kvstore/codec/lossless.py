"""Baseline: the chunk's own bytes, split into byte planes, through zstandard. Bit-exact.

Splitting an fp16 chunk into its low-byte plane (mantissa noise) and high-byte
plane (sign, exponent, top mantissa bits: very repetitive) lets zstd's entropy
stage model each plane on its own (measured in docs/codec.md).
"""

from __future__ import annotations

import numpy as np
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.dtypes import check_chunk, torch_dtype
from kvstore.codec.hint import EncodeHint
from kvstore.codec.sections import compress, decompress
from kvstore.codec.stream import pack_stream, unpack_stream

LOSSLESS_ID = 0
ZSTD_LEVEL = 1


class LosslessCodec(KVCodec):
    name = "lossless"

    def encode(self, kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> bytes:
        num_tokens = check_chunk(kv, layout, hint)  # the hint is checked, then not needed
        raw = kv.detach().cpu().contiguous().view(torch.uint8)
        planes = raw.reshape(-1, layout.dtype_size).t().contiguous()  # [dtype_size, N]
        frame = compress(memoryview(planes.numpy()).cast("B"), ZSTD_LEVEL)
        return pack_stream(LOSSLESS_ID, layout, num_tokens, 0, [frame])

    def decode(self, data: bytes | memoryview, layout: KVLayout) -> torch.Tensor:
        info = unpack_stream(data, layout, LOSSLESS_ID)
        if len(info.sections) != 1:
            raise CodecError(f"lossless stream must hold 1 section, got {len(info.sections)}")
        size = layout.bytes_per_chunk(info.num_tokens)
        raw = decompress(info.sections[0], size, "lossless planes")
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(layout.dtype_size, -1)
        values = torch.from_numpy(np.ascontiguousarray(planes.T)).view(torch_dtype(layout))
        return values.reshape(layout.shape(info.num_tokens))
