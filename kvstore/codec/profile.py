"""Per-model calibration the level encoders use to place their bits (decoders never need it).

A profile holds what the encoder cannot learn from one chunk of KV:

* ``plane_scales [2 * L]``: a step multiplier per plane (layer-major, K then V),
  set so that every plane costs the model about the same loss per bit
  (measured with the Fisher information of real continuations, see
  bench/codec_calibrate.py);
* ``mean_query [L, H_q, D]``: each query head's mean post-RoPE query over real
  text, with which the encoder predicts which tokens later queries will attend
  to (allocation.py);
* optionally ``bases [2 * L, C, C]`` and ``rope_inv_freq [D / 2]``: the
  transform stage (transform.py), each plane's principal axes over real text
  (keys pre-RoPE).

Profiles are looked up by the layout's model shape (layers, KV heads, head
dim). A layout without one gets :func:`generic_profile`: early layers finer,
no attention prediction and no transform. The steps travel in the stream,
so the scales and queries only change sizes and quality; a stream coded with a
transform names it (its fingerprint), and only a decoder with the same
profile reads it (else CodecError).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.transform import KVTransform

PROFILE_DIR = Path(__file__).parent / "profiles"
PROFILES = {(30, 3, 64): "smollm2-135m.npz"}
"""Model shape (num_layers, num_kv_heads, head_dim) -> profile file in PROFILE_DIR."""
GENERIC_EARLY_SCALE = 0.6
"""Generic profile: the first 20% of layers get 0.6x the step (the pre-profile measurement)."""
QUERY_DIMS = 16


@dataclass(frozen=True)
class ModelProfile:
    name: str
    plane_scales: torch.Tensor
    """[2 * num_layers] float32 step multipliers, plane order."""
    mean_query: torch.Tensor | None
    """[num_layers, num_q_heads, head_dim] float32, or None (no attention prediction)."""
    transform: KVTransform | None = None
    """The per-plane KLT (transform.py), or None (levels code the channels as they are)."""

    def __post_init__(self) -> None:
        if not bool(torch.isfinite(self.plane_scales).all() and (self.plane_scales > 0).all()):
            raise ValueError(f"profile {self.name}: plane scales must be finite and positive")

    def query_projection(self, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean queries on their QUERY_DIMS strongest dims per KV head, for one matmul.

        Averaged over positions, RoPE cancels a mean query's fast-rotating dims: its 16
        strongest of 64 hold nearly all of its energy (SmolLM2), so the predicted
        attention needs only those (docs/codec.md, "Measurements behind the code").

        Returns:
            channels ``[L, H * k]`` (long, within one token's ``H * D`` channels) and a
            block-diagonal ``[L, H * k, H_q]`` so ``keys[:, :, channels] @ it`` are the scores.
        """
        cache = self.__dict__.setdefault("_projections", {})  # frozen fields, a memo beside them
        if num_kv_heads not in cache:
            cache[num_kv_heads] = _project(self.mean_query, num_kv_heads)
        return cache[num_kv_heads]


def profile_for(layout: KVLayout) -> ModelProfile:
    """The calibrated profile of the layout's model shape, else the generic one."""
    shape = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    if shape in PROFILES:
        return load_profile(PROFILE_DIR / PROFILES[shape], shape)
    return generic_profile(layout.num_layers)


@functools.lru_cache(maxsize=8)
def load_profile(path: Path, shape: tuple[int, int, int]) -> ModelProfile:
    """Read a profile written by :func:`save_profile` for model ``shape`` (layers, KV heads, dim)."""
    num_layers, num_kv_heads, head_dim = shape
    with np.load(path, allow_pickle=False) as data:
        scales = torch.from_numpy(data["plane_scales"].astype(np.float32))
        query = torch.from_numpy(data["mean_query"].astype(np.float32))
        transform = _stored_transform(data, num_kv_heads)
    if scales.shape != (2 * num_layers,) or query.ndim != 3 or query.shape[0] != num_layers \
            or query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(f"profile {path.name} does not fit model shape {shape}")
    if transform is not None and transform.bases.shape != (2 * num_layers, num_kv_heads * head_dim,
                                                           num_kv_heads * head_dim):
        raise ValueError(f"profile {path.name}: transform bases do not fit model shape {shape}")
    return ModelProfile(path.stem, scales, query, transform)


def save_profile(path: Path, plane_scales: torch.Tensor, mean_query: torch.Tensor,
                 bases: torch.Tensor | None = None, rope_inv_freq: torch.Tensor | None = None) -> None:
    """Write a profile (fp16 arrays: a few tens of KB, ~4 MB with SmolLM2's bases)."""
    arrays = {"plane_scales": plane_scales.numpy().astype(np.float16),
              "mean_query": mean_query.numpy().astype(np.float16)}
    if bases is not None:
        arrays["bases"] = bases.numpy().astype(np.float16)
        arrays["rope_inv_freq"] = rope_inv_freq.numpy().astype(np.float32)
    np.savez_compressed(path, **arrays)


def read_arrays(path: Path) -> dict[str, torch.Tensor]:
    """Every array of a stored profile, as saved (to rewrite one part of it)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: torch.from_numpy(data[name].astype(np.float32)) for name in data.files}


def _stored_transform(data, num_kv_heads: int) -> KVTransform | None:
    if "bases" not in data.files:
        return None
    return KVTransform.from_stored(torch.from_numpy(data["bases"]),
                                   torch.from_numpy(data["rope_inv_freq"].astype(np.float32)),
                                   num_kv_heads)


def generic_profile(num_layers: int) -> ModelProfile:
    early = math.ceil(0.2 * num_layers)
    scales = torch.ones(num_layers)
    scales[:early] = GENERIC_EARLY_SCALE
    return ModelProfile("generic", scales.repeat_interleave(2), None)


def _project(mean_query: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers, num_q_heads, head_dim = mean_query.shape
    group, k = num_q_heads // num_kv_heads, min(QUERY_DIMS, head_dim)
    query = mean_query.view(num_layers, num_kv_heads, group, head_dim)
    dims = query.square().sum(2).topk(k, -1).indices.sort(-1).values  # [L, H, k]
    picked = query.gather(3, dims.unsqueeze(2).expand(-1, -1, group, -1))  # [L, H, G, k]
    block = torch.zeros(num_layers, num_kv_heads * k, num_q_heads)
    for h in range(num_kv_heads):  # a few heads, not per token
        block[:, h * k:(h + 1) * k, h * group:(h + 1) * group] = picked[:, h].transpose(1, 2)
    channels = dims + torch.arange(num_kv_heads).view(1, -1, 1) * head_dim
    return channels.reshape(num_layers, -1), block / head_dim ** 0.5
