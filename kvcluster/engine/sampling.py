"""Next-token choice: greedy or seeded sampling (temperature, top-k, top-p), and stopping.

Each sampled request owns a ``torch.Generator`` seeded from its params, so its
tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import secrets

import torch

from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.sequence import Sequence


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        """Create the request's generator (sampled requests only)."""
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self._generators[request_id] = torch.Generator().manual_seed(seed)

    def remove(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of ``logits [B, vocab]`` (fp32) for ``seqs``."""
        greedy = logits.argmax(dim=-1).tolist()  # [B]
        return [
            greedy[i] if seq.params.greedy
            else sample_token(logits[i], seq.params, self._generators[seq.request_id])
            for i, seq in enumerate(seqs)
        ]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample from ``logits [vocab]`` after temperature, top-k and top-p filtering."""
    logits = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth_largest = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def finish_reason(seq: Sequence, max_model_len: int, stop_ids: frozenset[int]) -> str | None:
    """Why ``seq`` must stop after its last token, or None to keep going."""
    if seq.token_ids[-1] in stop_ids:
        return "stop"
    if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass strictly before each token
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
