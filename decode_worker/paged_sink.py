"""A sink that writes received KV straight into the decode engine's paged blocks.

The request's blocks are allocated up front, through the runner's one
:class:`~kvcluster.engine.block_manager.BlockManager`, for a
:class:`~kvcluster.engine.sequence.Sequence` holding the streamed prompt tokens.
Decoded chunks go in with ``PagedKVCache.import_blocks``; recomputed chunks with the
runner's ``prefill`` over the blocks already written (the chunk attends to its
prefix). Chunks start on a block boundary (``chunk_tokens`` is a multiple of
``block_size``); a partial last block is zero-padded on import.

Every block and cache call holds ``lock`` (the decode worker's engine lock), since
the receiver's decode threads and the engine thread share the pool.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager, Sequence

import torch

from kvcluster.engine.sequence import Sequence as EngineSequence
from kvcluster.transfer.sink import KVSink, RecomputeSpeed, TokenRange


class PagedCacheSink(KVSink):
    def __init__(self, runner, seq: EngineSequence, speed: RecomputeSpeed | None = None,
                 lock: ContextManager | None = None):
        """
        Args:
            runner: a :class:`~kvcluster.engine.runner.ModelRunner` (owns the cache
                and its blocks).
            seq: the request on the receiving engine; its blocks are allocated here.
            lock: held around every block and cache call; None: no locking.
        Raises:
            OutOfBlocksError: the pool cannot hold the request's KV right now.
        """
        self.runner = runner
        self.cache = runner.cache
        self.seq = seq
        self.speed = speed or RecomputeSpeed()
        self._lock = lock or contextlib.nullcontext()
        with self._lock:
            runner.allocate_blocks(seq, seq.num_tokens)
        self.written: dict[int, str] = {}
        """Chunk index -> "decoded" or "recomputed"."""
        self.closed_ok: bool | None = None

    def write_chunk(self, index: int, token_range: TokenRange, kv: torch.Tensor) -> None:
        start, end = token_range
        block_ids = self._blocks(start, end)
        padded = len(block_ids) * self.cache.block_size
        if padded != end - start:  # partial last block
            kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, padded - (end - start)))
        with self._lock:
            self.cache.import_blocks(block_ids, kv.to(self.cache.dtype))
        self.written[index] = "decoded"

    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        start, end = token_range
        block_size = self.cache.block_size
        part = EngineSequence(f"{self.seq.request_id}/recompute{index}",
                              self.seq.token_ids[:end])
        part.attach_cached(self.seq.block_table[:-(-end // block_size)], start)
        began = time.perf_counter()
        with self._lock, torch.inference_mode():
            self.runner.prefill(part)
        self.speed.observe(end - start, time.perf_counter() - began)
        self.written[index] = "recomputed"

    def close(self, ok: bool) -> None:
        self.closed_ok = ok

    def discard(self) -> None:
        """Give the request's blocks back to the pool (idempotent)."""
        with self._lock:
            if self.seq.block_table:
                self.runner.free(self.seq)

    def _blocks(self, start: int, end: int) -> list[int]:
        block_size = self.cache.block_size
        if start % block_size:
            raise ValueError(f"chunk start {start} is not a multiple of block_size {block_size}")
        return self.seq.block_table[start // block_size:-(-end // block_size)]
