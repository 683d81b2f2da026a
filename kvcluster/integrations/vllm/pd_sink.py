"""BlockSink: one request's KV stream, written straight into its vLLM paged blocks.

    stream header -> BlockSink(token ids)        (the receiver's loop)
    chunk i decoded -> write_chunk               (a decode thread)
        registered: PagedKV.scatter into the request's blocks now
        not yet:    kept (a copy) until register() scatters it
    the scheduler's RecvSpec -> register(target) (vLLM's worker thread)
    release()                                    (vLLM's worker thread): no write after
                                                 it returns; how many tokens landed

Only a prefix of decoded chunks counts: from the first chunk that is not decoded (the
sender's text fallback, a checksum that kept failing, a stream cut short) everything
is left for vLLM to compute, so no block ever holds KV that does not belong to its
tokens. Chunk boundaries are block-aligned (transfer.chunk_tokens and store.chunk_tokens
are multiples of vLLM's block_size; the connector checks it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvcluster.integrations.vllm.metadata import RecvSpec
from kvcluster.integrations.vllm.paged_kv import PagedKV
from kvcluster.transfer.sink import KVSink, TokenRange


@dataclass(frozen=True)
class BlockTarget:
    """Where a request's streamed tokens ``[first_token, end_token)`` go."""

    block_ids: tuple[int, ...]
    """vLLM blocks of exactly those tokens, in order."""
    first_token: int
    end_token: int
    prompt_token_ids: tuple[int, ...]
    """The request's tokens ``[0, end_token)``: the stream must carry these."""

    @classmethod
    def of(cls, spec: RecvSpec) -> BlockTarget:
        """Where the scheduler's RecvSpec says the request's stream goes."""
        return cls(tuple(spec.block_ids), spec.first_token, spec.end_token,
                   tuple(spec.prompt_token_ids))


class BlockSink(KVSink):
    def __init__(self, paged: PagedKV, token_ids: Sequence[int]):
        """``token_ids``: the stream header's (every token the stream covers)."""
        self.paged = paged
        self.block_size = paged.shape.block_size
        self.token_ids = tuple(int(t) for t in token_ids)
        self.opened_s = time.monotonic()
        self.decoded_end = 0
        """Tokens from 0 covered by decoded chunks, without a gap."""
        self.broken = ""
        """Why the stream stopped counting (a chunk not decoded, a mismatch); "": not."""
        self.closed_ok: bool | None = None
        self._target: BlockTarget | None = None
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._written_end = 0
        self._released = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ receiver side

    def write_chunk(self, index: int, token_range: TokenRange, kv: torch.Tensor) -> None:
        start, end = token_range
        with self._lock:
            if self._released or self.broken:
                return
            if start != self.decoded_end or start % self.block_size:
                self.broken = f"chunk {index} at token {start} is not block-aligned after " \
                              f"{self.decoded_end}"
                return
            if self._target is None:
                self._pending.append((start, end, kv.clone()))  # kv is the receive buffer
            else:
                self._write(start, end, kv)
            self.decoded_end = end

    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        with self._lock:
            self.broken = self.broken or f"chunk {index} not decoded (vLLM computes it)"

    def close(self, ok: bool) -> None:
        with self._lock:
            self.closed_ok = ok
            if not ok:
                self.broken = self.broken or "stream failed"

    def discard(self) -> None:
        self.release()

    # ------------------------------------------------------------ vLLM side

    def register(self, target: BlockTarget) -> None:
        """The request's blocks are allocated: write what arrived so far, and every
        later chunk on arrival. A stream of other tokens writes nothing."""
        with self._lock:
            if self._released:
                return
            self._target = target
            n = min(len(self.token_ids), target.end_token)
            if self.token_ids[:n] != target.prompt_token_ids[:n]:
                self.broken = "the stream's tokens are not the request's"
            pending, self._pending = self._pending, []
            for start, end, kv in pending:
                if not self.broken:
                    self._write(start, end, kv)

    @property
    def done(self) -> bool:
        """The receiver closed the stream (complete, cut short or failed)."""
        return self.closed_ok is not None

    def release(self) -> int:
        """Stop writing. Returns the target's tokens, from its first, that hold the
        streamed KV (the rest of its blocks are vLLM's to compute)."""
        with self._lock:
            self._released = True
            self._pending = []
            target = self._target
            if target is None:
                return 0
            return max(0, self._written_end - target.first_token)

    # ------------------------------------------------------------ helpers

    def _write(self, start: int, end: int, kv: torch.Tensor) -> None:
        """Scatter the overlap of ``[start, end)`` with the target (under the lock)."""
        target = self._target
        assert target is not None
        lo, hi = max(start, target.first_token), min(end, target.end_token)
        hi -= (hi - lo) % self.block_size if hi > lo else 0  # whole blocks only
        if hi <= lo:
            return
        B, first = self.block_size, target.first_token
        blocks = target.block_ids[(lo - first) // B:(hi - first) // B]
        self.paged.scatter(blocks, kv[:, :, lo - start:hi - start])  # [L, 2, n, H, D]
        device = self.paged.device
        if device.type == "cuda":  # written before vLLM hears the stream is done
            torch.cuda.current_stream(device).synchronize()
        self._written_end = hi
