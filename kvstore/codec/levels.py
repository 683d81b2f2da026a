"""The bitrate levels: one base step ``alpha`` each, placed per row by allocation.py.

``alpha`` is the quantization step in units of a token's residual RMS (see
quantize.py), before the row scales of allocation.py (model profile, first
token, recent tokens, predicted or hinted attention). The levels are denser around
the quality goal than below it (sqrt(2) in step there). The values come from
bench/codec_quality.py (docs/codec.md has the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.allocation import max_scale, row_scales
from kvstore.codec.hint import NO_HINT, EncodeHint
from kvstore.codec.profile import profile_for


@dataclass(frozen=True)
class LevelSpec:
    name: str
    alpha: float
    """Base step / residual RMS, before the per-row scales."""

    def row_alphas(self, x: torch.Tensor, layout: KVLayout, hint: EncodeHint = NO_HINT) -> torch.Tensor:
        """Per-row alphas ``[P, T]`` for planes ``x: [P, T, C]`` of ``layout``."""
        return self.alpha * row_scales(x, layout, profile_for(layout), hint)

    def max_alpha(self, layout: KVLayout, hinted: bool = False) -> float:
        """The largest row alpha this level can use on ``layout`` (its error bound);
        ``hinted``: when encoding with an importance hint."""
        return self.alpha * max_scale(profile_for(layout), hinted)


LEVELS: tuple[LevelSpec, ...] = (
    LevelSpec("L0", 0.5),
    LevelSpec("L1", 0.6),
    LevelSpec("L2", 0.7),
    LevelSpec("L3", 1.0),
    LevelSpec("L4", 1.4),
    LevelSpec("L5", 2.0),
    LevelSpec("L6", 2.8),
)
"""Best quality first; denser around the quality goal (L0-L2), then sqrt(2) in step."""
