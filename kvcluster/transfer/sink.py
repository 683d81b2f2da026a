"""Where the receiver puts one request's KV: a small interface.

The receiver calls, in chunk order, either ``write_chunk`` (decoded KV) or
``recompute_chunk`` (tokens only: the sink recomputes the chunk, e.g. with the
engine's prefill over the prefix already written). Implementations:
:class:`~kvcluster.transfer.tensor_sink.TensorSink` (one tensor; tests and
benchmarks) and the decode worker's ``decode_worker.paged_sink.PagedCacheSink``
(the engine's paged blocks).
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

from kvcluster.transfer.messages import StreamHeader

TokenRange = tuple[int, int]
"""[start, end) token positions of the request."""


class KVSink(abc.ABC):
    @abc.abstractmethod
    def write_chunk(self, index: int, token_range: TokenRange, kv) -> None:
        """Store decoded KV ``[num_layers, 2, end - start, num_kv_heads, head_dim]``.

        ``kv`` may share memory with the receive buffer, which is reused once
        this returns: copy what you keep.
        """

    @abc.abstractmethod
    def recompute_chunk(self, index: int, token_range: TokenRange,
                        token_ids: Sequence[int]) -> None:
        """Recompute and store the KV of ``token_ids`` (chunks before it are written)."""

    def close(self, ok: bool) -> None:
        """The request is complete (``ok``) or abandoned; release or publish."""

    def discard(self) -> None:
        """Nobody will claim this request's KV: free whatever the sink holds."""


SinkFactory = Callable[[StreamHeader], KVSink]
"""Opens the sink of a new request from its stream header."""


class RecomputeSpeed:
    """Measured recompute speed (tokens/s), shared by a receiver's sinks."""

    def __init__(self, initial_tokens_per_s: float = 0.0, alpha: float = 0.3):
        self.tokens_per_s = initial_tokens_per_s
        self.alpha = alpha

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        sample = num_tokens / seconds
        if self.tokens_per_s <= 0:
            self.tokens_per_s = sample
        else:
            self.tokens_per_s += self.alpha * (sample - self.tokens_per_s)


class DecodeSpeeds:
    """Measured decode-and-write speed (tokens/s) per codec level, on the receiver."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self._speeds: dict[str, RecomputeSpeed] = {}

    def observe(self, level: str, num_tokens: int, seconds: float) -> None:
        self._speeds.setdefault(level, RecomputeSpeed(alpha=self.alpha)).observe(num_tokens, seconds)

    def as_tuple(self) -> tuple[tuple[str, float], ...]:
        return tuple((level, s.tokens_per_s) for level, s in sorted(self._speeds.items()))
