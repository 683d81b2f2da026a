"""What the engine can tell a level encoder about a chunk: the encode hint.

The level encoders place their bits by where later queries will look
(allocation.py). Without a hint they predict that from the model profile and
treat every chunk as a whole sequence (first token at int8, last 64 tokens
fine). At prefill time the engine knows better, and says so with a hint:

* ``importance``: the measured attention of the context's last queries onto
  each of the chunk's tokens, per layer (kvcluster.engine.attention_importance),
  normalised over the whole *sequence*, so a chunk that gets little attention
  is coded coarser than one that gets much;
* ``first_chunk``: the chunk starts the sequence (its first token is the
  attention sink: coded at int8 precision);
* ``last_chunk``: the chunk ends the sequence (its last tokens are what the
  next tokens attend to most: coded finer);
* ``position``: the position of the chunk's first token in its sequence, so
  keys can be coded in RoPE-free coordinates (transform.py). Any caller that
  knows where a chunk starts should say so, with or without the rest.

Decoders never need a hint: every step travels in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.codec.transform import MAX_POSITION


@dataclass(frozen=True)
class EncodeHint:
    importance: torch.Tensor | None = None
    """``[num_layers, num_tokens]`` float, finite, >= 0: each of the chunk's tokens'
    attention importance relative to the sequence (mean 1 per layer over the
    sequence's tokens after its first; :func:`chunk_hints` makes it). None: predict it."""
    first_chunk: bool = True
    """The chunk holds the sequence's first token (the attention sink)."""
    last_chunk: bool = True
    """The chunk holds the sequence's last tokens."""
    position: int = 0
    """The chunk's first token's position in its sequence. A wrong one decodes exactly
    the same, only larger (the stream carries it)."""

    def check(self, num_layers: int, num_tokens: int) -> None:
        """ValueError unless the importance and position fit a chunk of ``num_tokens`` tokens."""
        if not 0 <= self.position <= MAX_POSITION - num_tokens:
            raise ValueError(f"hint position {self.position} is out of range")
        imp = self.importance
        if imp is None:
            return
        if not isinstance(imp, torch.Tensor) or tuple(imp.shape) != (num_layers, num_tokens):
            got = tuple(imp.shape) if isinstance(imp, torch.Tensor) else type(imp).__name__
            raise ValueError(f"hint importance must be [{num_layers}, {num_tokens}], got {got}")
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError("hint importance must be finite and >= 0")


NO_HINT = EncodeHint()
"""What an encoder assumes without a hint: a whole sequence, attention predicted."""


def chunk_hints(importance: torch.Tensor, chunk_tokens: int) -> list[EncodeHint]:
    """Hints for a sequence cut into consecutive chunks of ``chunk_tokens`` (the last may be short).

    Args:
        importance: ``[num_layers, num_tokens]`` of the whole sequence, any scale
            (kvcluster.engine.attention_importance); normalised here.
        chunk_tokens: tokens per chunk (>= 1); ``num_tokens`` or more gives one hint.
    """
    if importance.dim() != 2 or importance.shape[1] == 0 or chunk_tokens < 1:
        raise ValueError(f"need importance [layers, tokens > 0] and chunk_tokens >= 1, "
                         f"got {tuple(importance.shape)} and {chunk_tokens}")
    relative = normalise(importance)
    pieces = relative.split(chunk_tokens, dim=1)
    return [EncodeHint(piece.contiguous(), i == 0, i == len(pieces) - 1, i * chunk_tokens)
            for i, piece in enumerate(pieces)]


def normalise(importance: torch.Tensor) -> torch.Tensor:
    """``importance [L, T]`` / its per-layer mean over tokens 1.. (the sink is left out)."""
    rest = importance[:, 1:] if importance.shape[1] > 1 else importance
    return importance.float() / rest.float().mean(1, keepdim=True).clamp_min(1e-30)
