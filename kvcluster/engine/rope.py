"""Rotary position embeddings in the Hugging Face ``rotate_half`` convention.

The cos/sin tables are precomputed once for every position up to the model's
context length, in fp32 as transformers does, then cast to the compute dtype.
"""

from __future__ import annotations

import math

import torch

from kvcluster.engine.arch import ModelArch, RopeScaling


def inv_frequencies(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (fp32), Llama 3 scaled if configured."""
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    if arch.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, arch.rope_scaling)
    return inv_freq


def rope_tables(
    arch: ModelArch, max_positions: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each ``[max_positions, head_dim]``."""
    inv_freq = inv_frequencies(arch)  # [D/2]
    positions = torch.arange(max_positions, dtype=torch.float32)  # [P]
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by per-token ``cos``/``sin`` ``[T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half(x)
    return x * cos + rotated * sin


def _llama3_scale(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling, exactly as transformers computes it."""
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
