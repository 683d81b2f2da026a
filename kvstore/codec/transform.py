"""The level codecs' transform stage: RoPE-free keys, then one KLT per plane.

A token's K (or V) row holds ``C = kv_heads * head_dim`` strongly correlated
channels, and a scalar quantizer codes each channel on its own. Rotating
every row into its plane's principal axes (the Karhunen-Loeve transform,
fitted offline on real text: bench/codec_calibrate.py) first concentrates the
energy in fewer coordinates; at the same step the symbols have less entropy
and the error is the same (the basis is orthonormal). Keys are first rotated
back to their pre-RoPE coordinates: RoPE turns a key by an angle that grows
with its position, which smears a basis fitted at one position over all of
them; pre-RoPE keys are close to low-rank (at equal quality the KLT on pre-RoPE
keys saves several times what it saves on post-RoPE keys, and per-head 64x64
bases lose most of it: docs/codec.md, "The transform stage, measured").

The pre-RoPE rotation needs the chunk's first position, which the encoder
gets from its hint and the stream carries. A wrong position only costs size:
the decoder undoes exactly the rotation the encoder applied.

Rows are ``[T, C]`` per plane, planes layer-major with K before V; both
directions are one batched matmul plus, for keys, the RoPE rotation
(``rotate_half`` convention, the engine's). With the codec kernels loaded
(native/planes.c) the rotation and the casts on each side of the matmul are
one pass over the rows (faster decode: docs/codec.md, "Measurements behind the code");
the torch path gives the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import xxhash

from kvstore.codec.native import planes_lib
from kvstore.codec.scratch import scratch

MAX_POSITION = (1 << 32) - 1
"""Positions travel as u32."""
COLUMN_GROUPS = (1 / 24, 1 / 6, 1 / 2)
"""Where the symbol column groups of transformed rows end, as shares of C (the
packing width is chosen per group, packing.pack_groups): 8 / 32 / 96 of 192."""
MATMUL_DTYPE = torch.bfloat16
"""The basis matmuls run in bf16 with fp32 accumulation: faster than fp32 on CPUs with
bf16 dot products, and the rounding (2^-9 relative) is far below the quantization
noise (KL to the fp16 KV unchanged; both measured in
docs/codec.md, "Measurements behind the code")."""


@dataclass(frozen=True)
class KVTransform:
    bases: torch.Tensor
    """``[P, C, C]`` float32, orthonormal columns: row ``y = x @ bases[p]``."""
    inv_freq: torch.Tensor
    """``[head_dim // 2]`` float32: the model's RoPE inverse frequencies (scaled if it scales them)."""
    num_kv_heads: int
    fingerprint: int
    """XXH3-64 of the stored bases and frequencies: a stream names the transform it used."""
    _forward16: torch.Tensor = field(init=False, repr=False, compare=False)
    _inverse16: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        planes, channels, other = self.bases.shape
        if channels != other or planes % 2 or channels % self.num_kv_heads \
                or 2 * self.inv_freq.numel() != channels // self.num_kv_heads:
            raise ValueError(f"transform bases {tuple(self.bases.shape)} do not fit "
                             f"{self.num_kv_heads} KV heads and {self.inv_freq.numel()} frequencies")
        object.__setattr__(self, "_forward16", self.bases.to(MATMUL_DTYPE))
        object.__setattr__(self, "_inverse16", self.bases.transpose(1, 2).contiguous().to(MATMUL_DTYPE))

    @classmethod
    def from_stored(cls, bases16: torch.Tensor, inv_freq: torch.Tensor,
                    num_kv_heads: int) -> "KVTransform":
        """From a profile's fp16 bases: re-orthonormalised (QR) so inverse == transpose."""
        digest = xxhash.xxh3_64(bases16.contiguous().numpy().tobytes())
        digest.update(inv_freq.float().contiguous().numpy().tobytes())
        q, r = torch.linalg.qr(bases16.double())
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # keep each column's sign
        return cls(q.float().contiguous(), inv_freq.float().contiguous(), num_kv_heads,
                   digest.intdigest())

    def forward(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """Planes ``x [P, T, C]`` -> coordinates ``[P, T, C]`` in MATMUL_DTYPE, in a scratch
        buffer of this thread (valid until its next ``forward``)."""
        rows = scratch("transform_low_in", x.shape, MATMUL_DTYPE)
        if planes_lib.usable(x.shape[-1]):  # one pass: cast, RoPE undone, rounded to bf16
            tables = _tables(self.inv_freq, position, x.shape[1], self.num_kv_heads, inverse=True)
            planes_lib.convert(x.contiguous(), rows, self.head_dim, tables)
        else:
            wide = scratch("transform_in", x.shape, torch.float32)
            wide.copy_(x)
            rotate_keys(wide, position, self.inv_freq, self.num_kv_heads, inverse=True)
            rows.copy_(wide)
        return torch.bmm(rows, self._forward16, out=scratch("transform_low_out", x.shape, MATMUL_DTYPE))

    def inverse(self, y: torch.Tensor, position: int, dtype: torch.dtype) -> torch.Tensor:
        """Coordinates ``y [P, T, C]`` (MATMUL_DTYPE, or any float dtype) -> planes
        ``[P, T, C]`` in ``dtype`` (a new tensor)."""
        if y.dtype != MATMUL_DTYPE:
            y = scratch("transform_low_in", y.shape, MATMUL_DTYPE).copy_(y)
        product = torch.bmm(y, self._inverse16, out=scratch("transform_product", y.shape, MATMUL_DTYPE))
        tables = _tables(self.inv_freq, position, y.shape[1], self.num_kv_heads, inverse=False)
        if planes_lib.usable(y.shape[-1]):  # one pass: RoPE redone, cast to dtype
            x = torch.empty(y.shape, dtype=dtype)
            planes_lib.convert(product, x, self.head_dim, tables)
            return x
        wide = scratch("transform_out", y.shape, torch.float32).copy_(product)
        _rotate(wide, tables, self.num_kv_heads)
        return wide.to(dtype, copy=True)

    @property
    def head_dim(self) -> int:
        return self.bases.shape[1] // self.num_kv_heads


def rotate_keys(planes: torch.Tensor, position: int, inv_freq: torch.Tensor, num_kv_heads: int,
                inverse: bool) -> None:
    """RoPE on the key planes (0, 2, 4, ...) of float32 ``planes [P, T, C]`` in place,
    tokens at ``position``..; ``inverse`` undoes it (pre-RoPE keys)."""
    tables = _tables(inv_freq, position, planes.shape[1], num_kv_heads, inverse)
    _rotate(planes, tables, num_kv_heads)


def column_groups(channels: int) -> tuple[int, ...]:
    """Group bounds ``(0, ..., channels)`` of transformed rows (empty groups dropped)."""
    inner = sorted({round(share * channels) for share in COLUMN_GROUPS} - {0, channels})
    return (0, *inner, channels)


def _tables(inv_freq: torch.Tensor, position: int, num_tokens: int, num_heads: int,
            inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[T, C]`` for ``x * cos + swap_halves(x) * sin``.

    The angles are the engine's (fp32 positions x frequencies); rotate_half
    negates the first half, and the inverse rotation negates the angle.
    """
    if not 0 <= position <= MAX_POSITION - num_tokens:
        raise ValueError(f"position {position} is out of range for {num_tokens} tokens")
    positions = torch.arange(position, position + num_tokens, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    sign = 1.0 if inverse else -1.0
    signed_sin = torch.cat([sign * sin, -sign * sin], dim=-1)  # [T, D]
    return cos.repeat(1, 2 * num_heads), signed_sin.repeat(1, num_heads)


def _rotate(planes: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], num_kv_heads: int) -> None:
    """``x * cos + swap_halves(x) * sin`` on the key planes of float32 ``planes`` in place."""
    num_planes, num_tokens, channels = planes.shape
    cos, sin = tables
    half = channels // num_kv_heads // 2
    keys = planes.view(num_planes // 2, 2, num_tokens, channels)[:, 0]  # [L, T, C]
    halves = keys.view(num_planes // 2, num_tokens, num_kv_heads, 2, half)
    swapped = scratch("transform_rope", keys.shape, torch.float32)  # (x2, x1) per head
    swapped.view(halves.shape)[..., 0, :].copy_(halves[..., 1, :])
    swapped.view(halves.shape)[..., 1, :].copy_(halves[..., 0, :])
    keys.mul_(cos).addcmul_(swapped, sin)  # x*cos + rotate_half(x)*sin, sin signed
