"""The bitrate levels: quantization coarseness per layer group, for keys and values.

``alpha`` is the quantization step in units of a token's residual RMS (see
quantize.py): the error bound of every element is ``alpha / 2`` of its token's
residual RMS. Layers split into three groups (first 20%, next 40%, last 40%);
early layers get finer steps. The numbers come from bench/codec_quality.py
(docs/codec.md has the measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LevelSpec:
    name: str
    alpha_k: tuple[float, float, float]
    """Key step / residual RMS for the early, middle and late layer groups."""
    alpha_v: tuple[float, float, float]
    """Value step / residual RMS, same groups."""

    def alphas(self, num_layers: int) -> torch.Tensor:
        """Per-plane alphas ``[num_layers * 2]`` in plane order (layer-major, K then V)."""
        groups = torch.tensor([layer_group(layer, num_layers) for layer in range(num_layers)])
        k = torch.tensor(self.alpha_k)[groups]
        v = torch.tensor(self.alpha_v)[groups]
        return torch.stack([k, v], dim=1).reshape(-1)  # [L * 2]

    def max_alpha(self) -> float:
        return max(self.alpha_k + self.alpha_v)


def layer_group(layer: int, num_layers: int) -> int:
    """0 for the first 20% of layers, 1 for the next 40%, 2 for the rest."""
    if layer < math.ceil(0.2 * num_layers):
        return 0
    return 1 if layer < math.ceil(0.6 * num_layers) else 2


EARLY_TILT = 0.6
"""Early layers get 0.6x the step of the others (measured on SmolLM2, docs/codec.md)."""


def _level(name: str, base: float) -> LevelSpec:
    groups = (base * EARLY_TILT, base, base)
    return LevelSpec(name, groups, groups)


LEVELS: tuple[LevelSpec, ...] = (
    _level("L0", 0.15),
    _level("L1", 0.3),
    _level("L2", 0.6),
    _level("L3", 1.2),
    _level("L4", 2.4),
)
"""Best quality first: each level doubles the step of the one before."""
