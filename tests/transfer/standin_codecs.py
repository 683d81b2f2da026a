"""Stand-in codecs used ONLY while kvstore.codec.factory is not implemented yet.

Raw bytes ("lossless"), per-token absmax int8 ("int8"), and packed 4-bit
("L1") and 2-bit ("L0") levels, so the transfer tests can run before the codec
lands.
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
    """Per-token absmax quantisation to ``bits`` (8, 4 or 2), packed into bytes."""

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits

    def encode(self, kv, layout):
        x = kv.float()  # [L, 2, T, H, D]
        scale = x.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-8)  # [L, 2, T, 1, 1]
        qmax = 2 ** (self.bits - 1) - 1
        q = (torch.round(x / scale * qmax) + qmax).to(torch.uint8).flatten().numpy()
        header = np.array([kv.shape[2]], dtype=np.int32).tobytes()
        return header + scale.numpy().astype(np.float32).tobytes() + self._pack(q).tobytes()

    def decode(self, data, layout):
        data = bytes(data)
        if len(data) < 4:
            raise CodecError("truncated")
        n = int(np.frombuffer(data[:4], dtype=np.int32)[0])
        shape = layout.shape(n)
        num_scales, count = shape[0] * shape[1] * shape[2], int(np.prod(shape))
        per_byte = 8 // self.bits
        if len(data) != 4 + 4 * num_scales + -(-count // per_byte):
            raise CodecError("bad size")
        scale = torch.from_numpy(np.frombuffer(data[4:4 + 4 * num_scales], dtype=np.float32).copy())
        packed = np.frombuffer(data[4 + 4 * num_scales:], dtype=np.uint8)
        q = torch.from_numpy(self._unpack(packed, count).astype(np.float32))
        qmax = 2 ** (self.bits - 1) - 1
        x = (q.view(shape) - qmax) / qmax * scale.view(*shape[:3], 1, 1)
        return x.to(torch_dtype(layout.dtype))

    def _pack(self, q: np.ndarray) -> np.ndarray:
        per_byte = 8 // self.bits
        q = np.pad(q, (0, -len(q) % per_byte)).reshape(-1, per_byte)
        shifts = np.arange(per_byte, dtype=np.uint8) * self.bits
        return np.bitwise_or.reduce(q << shifts, axis=1).astype(np.uint8)

    def _unpack(self, packed: np.ndarray, count: int) -> np.ndarray:
        per_byte = 8 // self.bits
        shifts = np.arange(per_byte, dtype=np.uint8) * self.bits
        values = (packed[:, None] >> shifts) & ((1 << self.bits) - 1)
        return values.reshape(-1)[:count]


def standin_codecs() -> dict[str, KVCodec]:
    return {"lossless": RawCodec(), "int8": QuantCodec("int8", 8), "L1": QuantCodec("L1", 4),
            "L0": QuantCodec("L0", 2)}
