"""ReceivedChunksSink: a vLLM decode instance's KV stream, assembled in host memory.

vLLM's paged blocks live in its worker process; the stream lands here (the decode
actor), then goes into that process's host tier in one call
(VLLMEngine.put_chunks), from where the connector loads it into the request's blocks.
A chunk the sender leaves to recompute (its text fallback) is simply not written: vLLM
computes it and everything after it.
"""

from __future__ import annotations

from typing import Sequence

from kvcluster.common.layout import KVLayout
from kvcluster.transfer.sink import TokenRange
from kvcluster.transfer.tensor_sink import TensorSink


class ReceivedChunksSink(TensorSink):
    def __init__(self, layout: KVLayout, token_ids: Sequence[int]):
        super().__init__(layout, token_ids)
        self.ends: dict[int, int] = {}
        """Chunk index -> its end token, for decoded chunks."""

    def write_chunk(self, index: int, token_range: TokenRange, kv) -> None:
        super().write_chunk(index, token_range, kv)
        self.ends[index] = token_range[1]

    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        self.written[index] = "recompute"  # vLLM computes it (and what follows)

    def decoded_prefix_tokens(self) -> int:
        """Tokens from 0 covered by decoded chunks without a gap."""
        end, index = 0, 0
        while self.written.get(index) == "decoded":
            end, index = self.ends[index], index + 1
        return end

    def discard(self) -> None:
        self.kv = self.kv[:, :, :0]  # free the buffer now
