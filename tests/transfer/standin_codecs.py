"""Stand-in codecs used ONLY while kvstore.codec.factory is not implemented yet.

Raw bytes ("lossless") and per-token absmax int8 ("int8"), plus a coarser
4-bit level ("L4"), so the transfer tests can run before the codec lands.
conftest.load_levels() prefers the real factory as soon as it works.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcluster.engine.dtypes import torch_dtype
from kvstore.codec.base import CodecError, KVCodec


class RawCodec(KVCodec):
    name = "lossless"

    def encode(self, kv, layout):
        return kv.contiguous().numpy().tobytes()

    def decode(self, data, layout):
        size = layout.bytes_per_token
        if len(data) % size:
            raise CodecError("truncated")
        flat = torch.frombuffer(bytearray(data), dtype=torch_dtype(layout.dtype))
        return flat.view(layout.shape(len(data) // size))


class QuantCodec(KVCodec):
    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits

    def encode(self, kv, layout):
        x = kv.float()  # [L, 2, T, H, D]
        scale = x.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-8)  # [L, 2, T, 1, 1]
        qmax = 2 ** (self.bits - 1) - 1
        q = torch.round(x / scale * qmax).to(torch.int8)
        header = np.array([kv.shape[2]], dtype=np.int32).tobytes()
        return header + scale.numpy().astype(np.float32).tobytes() + q.numpy().tobytes()

    def decode(self, data, layout):
        data = bytes(data)
        if len(data) < 4:
            raise CodecError("truncated")
        n = int(np.frombuffer(data[:4], dtype=np.int32)[0])
        shape = layout.shape(n)
        num_scales = shape[0] * shape[1] * shape[2]
        if len(data) != 4 + 4 * num_scales + int(np.prod(shape)):
            raise CodecError("bad size")
        scale = torch.from_numpy(np.frombuffer(data[4:4 + 4 * num_scales], dtype=np.float32).copy())
        q = torch.from_numpy(np.frombuffer(data[4 + 4 * num_scales:], dtype=np.int8).copy())
        qmax = 2 ** (self.bits - 1) - 1
        x = q.view(shape).float() / qmax * scale.view(*shape[:3], 1, 1)
        return x.to(torch_dtype(layout.dtype))


def standin_codecs() -> dict[str, KVCodec]:
    return {"lossless": RawCodec(), "int8": QuantCodec("int8", 8), "L4": QuantCodec("L4", 4)}
