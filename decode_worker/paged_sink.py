"""A sink that writes straight into the engine's paged KV blocks.

The receiving engine allocates the request's blocks up front (one
:class:`~kvcluster.engine.sequence.Sequence` holding the prompt); decoded
chunks go in with ``PagedKVCache.import_blocks``, recomputed chunks with the
runner's ``prefill`` over the blocks already written (the chunk attends to its
prefix). Chunks must start on a block boundary (``chunk_tokens`` a multiple of
``block_size``); a partial last block is zero-padded on import.

``on_chunk(index, token_range, kv)`` (optional) sees every chunk's KV, e.g. to
put it into the kvstore as well; ``kv`` may share the receive buffer, which is
reused after the call, so the hook copies what it keeps.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from kvcluster.engine.sequence import Sequence as EngineSequence
from kvcluster.transfer.sink import KVSink, RecomputeSpeed, TokenRange

ChunkHook = Callable[[int, TokenRange, torch.Tensor], None]


class PagedCacheSink(KVSink):
    def __init__(self, runner, seq: EngineSequence, speed: RecomputeSpeed | None = None,
                 on_chunk: ChunkHook | None = None):
        """
        Args:
            runner: a :class:`~kvcluster.engine.runner.ModelRunner` (owns the cache).
            seq: the request on the receiving engine; its blocks are allocated here.
        """
        self.runner = runner
        self.cache = runner.cache
        self.seq = seq
        self.speed = speed or RecomputeSpeed()
        self.on_chunk = on_chunk
        runner.allocate_blocks(seq, seq.num_tokens)
        self.written: dict[int, str] = {}
        self.closed_ok: bool | None = None

    def write_chunk(self, index: int, token_range: TokenRange, kv: torch.Tensor) -> None:
        start, end = token_range
        block_ids = self._blocks(start, end)
        padded = len(block_ids) * self.cache.block_size
        if padded != end - start:  # partial last block
            kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, padded - (end - start)))
        self.cache.import_blocks(block_ids, kv.to(self.cache.dtype))
        self.written[index] = "decoded"
        self._notify(index, token_range, kv[:, :, :end - start])

    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        start, end = token_range
        block_size = self.cache.block_size
        part = EngineSequence(f"{self.seq.request_id}/recompute{index}",
                              self.seq.token_ids[:end])
        part.attach_cached(self.seq.block_table[:-(-end // block_size)], start)
        began = time.perf_counter()
        with torch.inference_mode():
            self.runner.prefill(part)
        self.speed.observe(end - start, time.perf_counter() - began)
        self.written[index] = "recomputed"
        if self.on_chunk is not None:
            self._notify(index, token_range, self.export(start, end))

    def export(self, start: int, end: int) -> torch.Tensor:
        """KV of tokens [start, end) (start on a block boundary): ``[L, 2, end - start, H, D]``."""
        kv = self.cache.export_blocks(self._blocks(start, end))
        return kv[:, :, :end - start]

    def close(self, ok: bool) -> None:
        self.closed_ok = ok

    def discard(self) -> None:
        """Give the request's blocks back to the cache (idempotent)."""
        if self.seq.block_table:
            self.runner.free(self.seq)

    def _blocks(self, start: int, end: int) -> list[int]:
        block_size = self.cache.block_size
        if start % block_size:
            raise ValueError(f"chunk start {start} is not a multiple of block_size {block_size}")
        return self.seq.block_table[start // block_size:-(-end // block_size)]

    def _notify(self, index: int, token_range: TokenRange, kv: torch.Tensor) -> None:
        if self.on_chunk is not None:
            self.on_chunk(index, token_range, kv)
