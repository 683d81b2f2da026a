"""Bit allocation: how fine each row (one layer's K or V of one token) is quantized.

A level has one base ``alpha`` (step / residual RMS, see quantize.py). Each row
gets ``alpha * row_scale[p, t]`` with, measured on SmolLM2 (docs/codec.md):

* the **plane scale** of the model profile: planes differ widely in how much
  loss a unit of quantization noise causes (profile.py);
* the **first token** of the chunk at full int8 precision (scale 0: the step is
  then ``max|r| / 127``): the attention sink, which later layers give most of
  their attention to, sits there in a chunk that starts a sequence;
* the **last RECENT_TOKENS** tokens at RECENT_SCALE: the next tokens attend
  to them most;
* an **attention scale** per (layer, token): the encoder predicts how much
  attention later queries pay each token from the profile's mean query per
  head, ``a_t = softmax_t(q_mean . k_t / sqrt(D))`` (on the mean query's 16
  strongest dims, profile.py); a token's loss per unit of noise grows with
  ``a_t^2`` (key and value errors both reach the output through the attention
  weight), so with ``w_t = sum over query heads of a_t^2`` its step is
  ``(w_t / mean(w) + EPS)^-1/2``, normalised to geometric mean 1 per layer
  and clamped to ``[1 / ATTENTION_CLAMP, ATTENTION_CLAMP]``.

An **encode hint** (hint.py) replaces the guesses with what the engine knows:
the first-token and recent-token rules apply only to the sequence's first and
last chunk, and a measured importance ``m_t`` (the attention mass the
context's last 64 queries pay each token, relative to the sequence's mean,
kvcluster/engine/attention_importance.py) replaces the prediction:
``HINT_GAIN * (m_t + HINT_EPS)^-1/2``, clamped to ``[1 / HINT_CLAMP, HINT_CLAMP]``
and *not* renormalised per chunk. Measured (docs/codec.md, "The encode hint"): the
attention mass beat ``sum a_t^2`` of the same queries at equal KL; HINT_GAIN puts
L0 + hint at about the KL that L0 without a hint had before the transform stage,
at fewer bits.

Rows are also given an **order class** (u8, from the log2 of their scale):
symbols are written class by class, so zstd's Huffman tables see rows of
alike spread together (smaller than plane order: docs/codec.md, "Measurements behind the code").
"""

from __future__ import annotations

import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.hint import NO_HINT, EncodeHint
from kvstore.codec.profile import ModelProfile

RECENT_TOKENS = 64
RECENT_SCALE = 0.25
EPS = 0.1
ATTENTION_CLAMP = 4.0
HINT_EPS = 0.1
HINT_GAIN = 0.9
"""Step multiplier of a token of mean importance (with HINT_EPS: 0.86); sets where the
hinted levels sit (the sweep that chose it: docs/codec.md, "The encode hint")."""
HINT_CLAMP = 8.0
CLASSES_PER_OCTAVE = 2
SINK_CLASS = 0
"""Order class of the first token's rows (scale 0); the others are 1..255."""


def row_scales(x: torch.Tensor, layout: KVLayout, profile: ModelProfile,
               hint: EncodeHint = NO_HINT) -> torch.Tensor:
    """Step multipliers ``[P, T]`` for planes ``x: [P, T, C]`` (P = 2 * layers, plane order)."""
    num_tokens = x.shape[1]
    scales = profile.plane_scales.unsqueeze(1).repeat(1, num_tokens)  # [P, T]
    if hint.last_chunk:
        scales[:, -RECENT_TOKENS:] *= RECENT_SCALE
    if hint.importance is not None:
        scales *= measured_scales(hint.importance).repeat_interleave(2, dim=0)
    elif profile.mean_query is not None and num_tokens > 1:
        channels, block = profile.query_projection(layout.num_kv_heads)
        scales *= attention_scales(x[0::2], channels, block).repeat_interleave(2, dim=0)
    if hint.first_chunk:
        scales[:, 0] = 0.0
    return scales


def measured_scales(importance: torch.Tensor) -> torch.Tensor:
    """Per-(layer, token) step multipliers ``[L, T]`` from a hint's relative importance.

    Not renormalised per chunk: the importance is relative to the whole sequence,
    so a little-attended chunk is coded coarser than a much-attended one.
    """
    scale = (importance.float() + HINT_EPS).rsqrt() * HINT_GAIN
    return scale.clamp(1 / HINT_CLAMP, HINT_CLAMP)


def attention_scales(keys: torch.Tensor, channels: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Per-(layer, token) step multipliers ``[L, T]`` from key planes ``[L, T, C]``.

    ``channels``/``block`` come from :meth:`ModelProfile.query_projection`. The
    first token is left out of the normalisation (it is kept at int8 anyway).
    """
    num_layers, num_tokens, _ = keys.shape
    picked = keys.gather(2, channels.unsqueeze(1).expand(-1, num_tokens, -1)).float()
    scores = torch.bmm(picked, block)  # [L, T, H_q]
    weight = scores.softmax(1)[:, 1:].square().sum(-1)  # [L, T - 1]
    rel = weight / weight.mean(-1, keepdim=True).clamp_min(1e-30)
    scale = (rel + EPS).rsqrt()
    scale = scale / scale.log().mean(-1, keepdim=True).exp()
    return torch.cat([torch.ones(num_layers, 1), scale.clamp(1 / ATTENTION_CLAMP, ATTENTION_CLAMP)], 1)


def order_classes(scales: torch.Tensor) -> torch.Tensor:
    """u8 order class per row ``[P, T]``: rows of alike scale share a class."""
    log_scale = torch.log2(scales.clamp_min(2.0 ** -60))
    cls = torch.round(log_scale * CLASSES_PER_OCTAVE) + 128
    cls = cls.clamp(SINK_CLASS + 1, 255).to(torch.uint8)
    return torch.where(scales > 0, cls, torch.full_like(cls, SINK_CLASS))


def max_scale(profile: ModelProfile, hinted: bool = False) -> float:
    """Largest row scale the profile can give (for the documented error bound).

    ``hinted``: with an importance hint (measured_scales' clamp instead of the prediction's).
    """
    clamp = ATTENTION_CLAMP if profile.mean_query is not None else 1.0
    if hinted:  # importance >= 0: the coarsest measured scale is HINT_GAIN / sqrt(HINT_EPS)
        clamp = min(HINT_CLAMP, HINT_GAIN * HINT_EPS ** -0.5)
    return float(profile.plane_scales.max()) * clamp
