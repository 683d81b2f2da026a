"""What one stored chunk is: its layout, token count, byte size and tensor views.

A chunk of ``chunk_tokens`` tokens is stored as ``chunk_bytes`` raw bytes in
the layout's byte order; pools hold it as a flat uint8 row and view it as a
typed tensor only to copy::

    typed view: [num_layers, 2 (K, V), chunk_tokens, num_kv_heads, head_dim]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import TORCH_DTYPES

ChunkData = Union[torch.Tensor, bytes, bytearray, memoryview]
KVInput = Union[torch.Tensor, Sequence[ChunkData]]


@dataclass(frozen=True)
class ChunkSpec:
    layout: KVLayout
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0 or self.chunk_tokens % self.layout.block_size:
            raise ValueError(
                f"chunk_tokens ({self.chunk_tokens}) must be a positive multiple of "
                f"the layout's block_size ({self.layout.block_size})"
            )

    @property
    def chunk_bytes(self) -> int:
        return self.layout.bytes_per_chunk(self.chunk_tokens)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.shape(self.chunk_tokens)

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.layout.dtype]

    def typed(self, flat: torch.Tensor) -> torch.Tensor:
        """View a flat uint8 row of ``chunk_bytes`` as one chunk tensor."""
        return flat.view(self.dtype).view(self.shape)

    def split(self, kv: KVInput, num_chunks: int) -> list[torch.Tensor]:
        """Per-chunk typed views of ``kv`` (no copy for tensors).

        Accepts a tensor shaped ``layout.shape(num_chunks * chunk_tokens)``
        (what ``PagedKVCache.export_blocks`` returns), a tensor shaped
        ``(num_chunks, *shape)``, or a sequence of per-chunk tensors or
        raw byte strings.
        """
        if isinstance(kv, torch.Tensor):
            return self._split_tensor(kv, num_chunks)
        if len(kv) != num_chunks:
            raise ValueError(f"got {len(kv)} chunks of KV for {num_chunks} keys")
        return [self.as_chunk(item) for item in kv]

    def as_chunk(self, item: ChunkData) -> torch.Tensor:
        """One chunk as a typed tensor view; checks its shape, dtype or length."""
        if isinstance(item, torch.Tensor):
            self._check_tensor(item, self.shape)
            return item
        if memoryview(item).nbytes != self.chunk_bytes:
            raise ValueError(f"a chunk is {self.chunk_bytes} bytes, got {memoryview(item).nbytes}")
        with warnings.catch_warnings():  # read-only bytes: we only ever copy from it
            warnings.simplefilter("ignore", UserWarning)
            return self.typed(torch.frombuffer(item, dtype=torch.uint8))

    def tokens_view(self, kv: torch.Tensor, index: int) -> torch.Tensor:
        """Chunk ``index`` of a token-range tensor ``layout.shape(n * chunk_tokens)``."""
        start = index * self.chunk_tokens
        return kv[:, :, start : start + self.chunk_tokens]

    def empty_tokens(self, num_chunks: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """An uninitialised ``layout.shape(num_chunks * chunk_tokens)`` tensor."""
        shape = self.layout.shape(num_chunks * self.chunk_tokens)
        return torch.empty(shape, dtype=self.dtype, device=device)

    def check_tokens(self, out: torch.Tensor, num_chunks: int) -> None:
        """``out`` must be ``layout.shape(m)`` with ``m >= num_chunks * chunk_tokens``."""
        want = self.layout.shape(num_chunks * self.chunk_tokens)
        if (out.dtype != self.dtype or out.dim() != 5 or out.shape[2] < want[2]
                or tuple(out.shape[:2]) + tuple(out.shape[3:]) != want[:2] + want[3:]):
            raise ValueError(f"out must be {self.dtype} shaped {want}, got "
                             f"{out.dtype} {tuple(out.shape)}")

    # ------------------------------------------------------------ private

    def _split_tensor(self, kv: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
        if kv.dim() == 6:
            self._check_tensor(kv, (num_chunks, *self.shape))
            return list(kv.unbind(0))
        self._check_tensor(kv, self.layout.shape(num_chunks * self.chunk_tokens))
        return [self.tokens_view(kv, i) for i in range(num_chunks)]

    def _check_tensor(self, kv: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(kv.shape) != tuple(shape):
            raise ValueError(f"KV tensor shape {tuple(kv.shape)} != expected {tuple(shape)}")
        if kv.dtype != self.dtype:
            raise ValueError(f"KV dtype {kv.dtype} != layout dtype {self.dtype}")
