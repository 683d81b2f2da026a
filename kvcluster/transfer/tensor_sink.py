"""A sink that assembles one request's KV into a single tensor."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from kvcluster.common.layout import KVLayout
from kvcluster.engine.dtypes import torch_dtype
from kvcluster.transfer.sink import KVSink, RecomputeSpeed, TokenRange

RecomputeFn = Callable[[Sequence[int], int], torch.Tensor]
"""(all token ids up to the chunk's end, chunk start) -> the chunk's KV."""


class TensorSink(KVSink):
    def __init__(self, layout: KVLayout, token_ids: Sequence[int],
                 recompute_fn: RecomputeFn | None = None,
                 speed: RecomputeSpeed | None = None):
        """
        Args:
            token_ids: every token of the request (recompute needs the prefix).
            recompute_fn: computes a chunk's KV from its tokens; None: cannot recompute.
            speed: updated with every recompute's measured tokens/s.
        """
        self.layout = layout
        self.token_ids = list(token_ids)
        self.recompute_fn = recompute_fn
        self.speed = speed or RecomputeSpeed()
        self.kv = torch.zeros(layout.shape(len(self.token_ids)), dtype=torch_dtype(layout.dtype))
        self.written: dict[int, str] = {}
        """chunk index -> "decoded" or "recomputed"."""
        self.closed_ok: bool | None = None

    def write_chunk(self, index: int, token_range: TokenRange, kv: torch.Tensor) -> None:
        start, end = token_range
        self.kv[:, :, start:end] = kv  # [L, 2, n, H, D]
        self.written[index] = "decoded"

    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        if self.recompute_fn is None:
            raise RuntimeError("this sink cannot recompute")
        start, end = token_range
        assert list(token_ids) == self.token_ids[start:end], "token ids disagree with header"
        began = time.perf_counter()
        self.kv[:, :, start:end] = self.recompute_fn(self.token_ids[:end], start)
        self.speed.observe(end - start, time.perf_counter() - began)
        self.written[index] = "recomputed"

    def close(self, ok: bool) -> None:
        self.closed_ok = ok
