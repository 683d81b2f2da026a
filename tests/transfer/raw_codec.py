"""A pass-through codec for the session unit tests (KV bytes as they are).

Keeps ``test_session.py`` independent of the real codecs' formats; every
other transfer test uses ``kvstore.codec.factory``.
"""

from __future__ import annotations

import torch

from kvcluster.engine.dtypes import torch_dtype
from kvstore.codec.base import CodecError, KVCodec


class RawCodec(KVCodec):
    name = "lossless"

    def encode(self, kv, layout, hint=None):
        return kv.contiguous().numpy().tobytes()

    def decode(self, data, layout):
        size = layout.bytes_per_token
        if len(data) % size:
            raise CodecError("truncated")
        flat = torch.frombuffer(bytearray(data), dtype=torch_dtype(layout.dtype))
        return flat.view(layout.shape(len(data) // size))
