"""The KV layout: one frozen value from which every byte size and shape derives.

Byte order of any token range (the engine's export, the store's chunks, the
codec's input and the wire all use it, so nothing reshapes per call)::

    [num_layers, 2 (K, V), num_tokens, num_kv_heads, head_dim]   C-contiguous

A chunk of N tokens is therefore ``layout.bytes_per_token * N`` bytes, and the
slice of one layer is contiguous.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    """Tokens per paged-cache block (and per hashed block)."""
    dtype: str = "float16"
    """One of float32, float16, bfloat16."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"KVLayout.dtype must be one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}"
            )

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def elements_per_token(self) -> int:
        """K and V of every layer for one token."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        return self.elements_per_token * self.dtype_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def bytes_per_chunk(self, num_tokens: int) -> int:
        return self.bytes_per_token * num_tokens

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Tensor shape of ``num_tokens`` tokens in the layout's byte order."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def with_dtype(self, dtype: str) -> "KVLayout":
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, dtype)

    @property
    def identity(self) -> str:
        """Human-readable identity, stored in file headers and stream headers."""
        return (
            f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}"
            f"-B{self.block_size}-{self.dtype}"
        )

    @property
    def fingerprint(self) -> int:
        """64-bit identity for fixed-size binary headers."""
        digest = hashlib.sha256(self.identity.encode()).digest()
        return int.from_bytes(digest[:8], "little")
