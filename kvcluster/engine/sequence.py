"""One request's state in the engine: its tokens, its block table, its progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as SequenceT

from kvcluster.common.sampling import SamplingParams


@dataclass(eq=False)  # identity: two requests with equal tokens are still two
class Sequence:
    """Invariant: KV of ``token_ids[:num_computed_tokens]`` is in ``block_table``'s blocks."""

    request_id: str
    token_ids: list[int]
    """Prompt then generated tokens."""
    params: SamplingParams = field(default_factory=SamplingParams)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV was attached from a cache instead of computed."""
    num_prompt_tokens: int = -1
    finish_reason: str | None = None
    """None while running; "stop" (stop token) or "length"."""
    arrival_s: float = 0.0
    """``time.perf_counter()`` when the engine queued it (vLLM's RequestMetrics)."""
    scheduled_s: float = 0.0
    """When its (last) prefill began; minus ``arrival_s``: time in the engine's queue."""
    first_token_s: float = 0.0
    """When its first token was sampled; minus ``scheduled_s``: its prefill step."""

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        if not self.token_ids:
            raise ValueError(f"request {self.request_id!r}: empty prompt")
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def attach_cached(self, block_ids: SequenceT[int], num_tokens: int) -> None:
        """Use already-filled blocks for the first ``num_tokens`` prompt tokens.

        The caller hands over one reference to each block (the sequence frees
        them when it is freed).
        """
        if self.block_table or self.num_computed_tokens:
            raise ValueError(f"request {self.request_id!r}: cached blocks must come first")
        if num_tokens > self.num_tokens:
            raise ValueError(f"{num_tokens} cached tokens > prompt length {self.num_tokens}")
        self.block_table = list(block_ids)
        self.num_computed_tokens = self.num_cached_tokens = num_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
