"""The lossy transform of the level codecs: reference choice, per-token steps, symbols.

Per plane (one layer's K or V) ``x: [T, C]`` (C = kv_heads * head_dim), every
token t is coded as a residual from one of three references, whichever leaves
the least energy (chosen per token by measurement, see docs/codec.md):

    REF_ZERO    0                       (small tokens, e.g. the attention sink)
    REF_MEAN    mu[c]                   (the chunk's per-channel mean, fp16)
    REF_ANCHOR  xhat[anchor(t)]         (the reconstructed first token of t's group)

Anchors (t % group_size == 0) are coded on their own (ZERO or MEAN only). The
residual is quantized on a per-token uniform grid (``alpha`` per row comes from
allocation.py; 0 gives the finest step, ``max|r| / 127``)::

    step[t] = max(alpha[t] * rms(residual[t]), max|residual[t]| / 127),
              rounded UP to the grid 2^(e/8), e an int16 exponent (so at most 9% coarser)
    q[t, c] = round(residual[t, c] / step[t])          |q| <= 127, int8
    xhat    = ref + q * step                           |x - xhat| <= step / 2

Speed: every pass over the chunk runs in place on one float32 scratch buffer
(fresh 50 MB tensors cost more in page faults than the arithmetic); the
per-token reference is applied as a broadcast for REF_MEAN plus index fix-ups
for the (fewer) other rows. Energies come from norms and dot products, never
from materialised residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.codec.native import planes_lib
from kvstore.codec.scratch import scratch

REF_ZERO, REF_MEAN, REF_ANCHOR = 0, 1, 2
MAX_SYMBOL = 127
MIN_STEP = 2.0 ** -14  # fp16's smallest normal: keeps 1/step finite
MAX_STEP = 65504.0
STEPS_PER_OCTAVE = 8
MIN_EXP, MAX_EXP = -14 * STEPS_PER_OCTAVE, 16 * STEPS_PER_OCTAVE
"""Level steps are 2^(e / 8) for int16 e in [MIN_EXP, MAX_EXP]: 2 bytes a row like fp16,
but zstd packs the exponents of alike rows tighter than fp16 steps
(docs/codec.md, "Measurements behind the code")."""
_STEP_TABLE = torch.tensor([2.0 ** (e / STEPS_PER_OCTAVE) for e in range(MIN_EXP, MAX_EXP + 1)],
                           dtype=torch.float64).float()  # one table: encoder and decoder agree


@dataclass
class Quantized:
    """What a level stream carries, as tensors (P planes = layers * 2, T tokens, C channels)."""

    mean: torch.Tensor  # [P, C]    float16
    step_exps: torch.Tensor  # [P, T] int16: step = 2^(e / 8)
    refs: torch.Tensor  # [P, T]    uint8 (REF_*)
    symbols: torch.Tensor  # [P, T, C] int8


def quantize(x_in: torch.Tensor, alpha: torch.Tensor, group_size: int) -> Quantized:
    """Quantize planes ``x_in: [P, T, C]`` (any float dtype) with per-row ``alpha: [P, T]``."""
    num_tokens = x_in.shape[1]
    x = _padded_scratch(x_in.shape, group_size)  # [P, T, C] view of [P, G * g, C]
    x.copy_(x_in)
    mean16 = x.mean(dim=1).to(torch.float16)  # [P, C]
    mu = mean16.float()
    e_zero = torch.linalg.vector_norm(x, dim=-1).square()  # [P, T]
    x.sub_(mu.unsqueeze(1))  # x is now the residual vs REF_MEAN
    e_mean = torch.linalg.vector_norm(x, dim=-1).square()
    anchors = torch.arange(0, num_tokens, group_size)
    anchor_refs = (e_mean[:, anchors] < e_zero[:, anchors]).long()  # REF_ZERO or REF_MEAN
    anchor_x = torch.where(anchor_refs.unsqueeze(-1) == REF_MEAN, x[:, anchors],
                           x_in[:, anchors].float())
    anchor_e = torch.where(anchor_refs == REF_MEAN, e_mean[:, anchors], e_zero[:, anchors])
    anchor_q = _code_residuals(anchor_x, anchor_e, anchor_refs, alpha[:, anchors])
    offset = _reconstruct_rows(anchor_q, anchor_refs, mu) - mu.unsqueeze(1)  # xhat_a - mu [P, G, C]
    e_anchor = _anchor_energy(x, offset, e_mean, group_size)
    e_anchor[:, anchors] = float("inf")
    energy = torch.stack([e_zero, e_mean, e_anchor], dim=-1)  # [P, T, 3]
    refs = energy.argmin(-1)  # [P, T]
    _apply_refs(x, x_in, refs, offset, group_size)
    q = _code_residuals(x, energy.gather(-1, refs.unsqueeze(-1)).squeeze(-1), refs, alpha)
    q.symbols[:, anchors] = anchor_q.symbols
    q.step_exps[:, anchors] = anchor_q.step_exps
    q.mean = mean16
    return q


def dequantize(q: Quantized, group_size: int, dtype: torch.dtype, into_scratch: bool = False,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: a fresh ``[P, T, C]`` tensor in ``dtype``; with
    ``into_scratch``, a scratch buffer of this thread (for one more pass).

    ``rows``: ``q.symbols`` is ``[R, C]`` in another row order, and row (p, t) is
    ``q.symbols[rows[p * T + t]]`` (the stream's order, cachegen.py).
    """
    shape = (*q.step_exps.shape, q.symbols.shape[-1])
    problem = refs_problem(q.refs, group_size)
    if problem is not None:
        raise ValueError(problem)
    symbols = q.symbols.reshape(-1, shape[-1])
    steps = exp_steps(q.step_exps)
    if planes_lib.usable(shape[-1]):
        out = _output(shape, dtype, into_scratch)
        where = torch.arange(shape[0] * shape[1]) if rows is None else rows
        planes_lib.dequantize(symbols.contiguous(), where, q.mean.float(), steps, q.refs.contiguous(),
                              group_size, out)
        return out
    in_planes = symbols if rows is None else symbols.index_select(0, rows)
    x = _dequantize_wide(in_planes.view(shape), q, steps, group_size)
    if into_scratch and dtype == torch.float32:
        return x
    return _output(shape, dtype, into_scratch).copy_(x)


def refs_problem(refs: torch.Tensor, group_size: int) -> str | None:
    """Why references ``refs [P, T]`` cannot be decoded, or None. Anchors are coded
    against zero or the mean; one naming an anchor has nothing to refer to."""
    if bool((refs > REF_ANCHOR).any()):
        return "refs section holds an unknown reference kind"
    if bool((refs[:, ::group_size] == REF_ANCHOR).any()):
        return "refs section has an anchor row that refers to an anchor"
    return None


def _output(shape, dtype: torch.dtype, into_scratch: bool) -> torch.Tensor:
    return scratch(f"dequantized_{dtype}", shape, dtype) if into_scratch else torch.empty(shape, dtype=dtype)


def step_exponents(step: torch.Tensor) -> torch.Tensor:
    """The smallest int16 ``e`` with ``2^(e/8) >= step`` (step clamped to [MIN_STEP, MAX_STEP]).

    Raises:
        ValueError: a non-finite step (the chunk holds inf or NaN).
    """
    step = _finite_clamped(step)
    exps = torch.ceil(torch.log2(step) * STEPS_PER_OCTAVE).clamp(MIN_EXP, MAX_EXP).to(torch.int16)
    return exps + (exp_steps(exps) < step).to(torch.int16)  # log2 may round low by an ulp


def _finite_clamped(step: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(step).all()):
        raise ValueError("kv holds non-finite values (inf or NaN); only lossless can carry them")
    return step.clamp(MIN_STEP, MAX_STEP)


def exp_steps(exps: torch.Tensor) -> torch.Tensor:
    """float32 steps of int16 exponents in [MIN_EXP, MAX_EXP]."""
    return _STEP_TABLE[exps.long() - MIN_EXP]


def fp16_steps(step: torch.Tensor) -> torch.Tensor:
    """Round float32 steps UP to fp16, so ``|residual| / step16 <= 127`` still holds.

    Raises:
        ValueError: a non-finite step (the chunk holds inf or NaN).
    """
    step = _finite_clamped(step)
    step16 = step.to(torch.float16)
    up = (step16.view(torch.int16) + 1).view(torch.float16)  # next fp16 up (positive, finite)
    return torch.where(step16.float() < step, up, step16)


# ---------------------------------------------------------------- helpers


def _dequantize_wide(symbols: torch.Tensor, q: Quantized, steps: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """:func:`dequantize` in torch, into this thread's float32 scratch (symbols in plane order)."""
    mu = q.mean.float()  # [P, C]
    x = scratch("x", symbols.shape, torch.float32)
    x.copy_(symbols)
    torch.addcmul(mu.unsqueeze(1), x, steps.unsqueeze(-1), out=x)  # every row as REF_MEAN
    p, t = (q.refs == REF_ZERO).nonzero(as_tuple=True)
    x[p, t] = symbols[p, t].float() * steps[p, t].unsqueeze(-1)
    p, t = (q.refs == REF_ANCHOR).nonzero(as_tuple=True)
    if len(p):
        anchor_hat = x[p, t - t % group_size]  # anchors are final: never REF_ANCHOR
        x[p, t] = torch.addcmul(anchor_hat, symbols[p, t].float(), steps[p, t].unsqueeze(-1))
    return x


def _padded_scratch(shape, group_size: int) -> torch.Tensor:
    """Scratch [P, T, C] whose storage holds whole groups, so groups view without copies."""
    num_planes, num_tokens, channels = shape
    padded = -(-num_tokens // group_size) * group_size
    buf = scratch("x", (num_planes, padded, channels), torch.float32)
    buf[:, num_tokens:] = 0
    return buf[:, :num_tokens]


def _anchor_energy(r, offset, e_mean, group_size: int) -> torch.Tensor:
    """||x_t - xhat_a(t)||^2 = ||r_t - offset_a(t)||^2 -> [P, T], from one dot product per row.

    r: residual vs mean [P, T, C] in padded storage; offset: xhat_anchor - mu [P, G, C].
    """
    num_planes, num_tokens, channels = r.shape
    num_groups = offset.shape[1]
    grouped = r.as_strided((num_planes * num_groups, group_size, channels),
                           (group_size * channels, channels, 1))  # whole groups, see _padded_scratch
    products = scratch("anchor_products", grouped.shape, torch.float32)
    dot = torch.mul(grouped, offset.reshape(-1, 1, channels), out=products).sum(-1)  # 2x a batched matvec
    dot = dot.reshape(num_planes, -1)
    o_sq = offset.square().sum(-1).repeat_interleave(group_size, dim=1)
    return (e_mean - 2 * dot[:, :num_tokens] + o_sq[:, :num_tokens]).clamp_min(0)


def _apply_refs(x, x_in, refs, offset, group_size: int) -> None:
    """Turn the mean residual ``x`` into each row's own residual, in place."""
    p, t = (refs == REF_ZERO).nonzero(as_tuple=True)
    x[p, t] = x_in[p, t].float()
    p, t = (refs == REF_ANCHOR).nonzero(as_tuple=True)
    x.index_put_((p, t), -offset[p, t // group_size], accumulate=True)


def _code_residuals(x, energy, refs, alpha) -> Quantized:
    """Steps and symbols of residual rows ``x: [P, N, C]`` (float32; divided in place
    on the torch path)."""
    native = planes_lib.usable(x.shape[-1]) and planes_lib.rows_contiguous(x)
    rms = (energy / x.shape[-1]).sqrt()  # [P, N]
    if native:
        peak = planes_lib.row_peaks(x) / MAX_SYMBOL
    else:
        peak = torch.maximum(x.amax(-1), -x.amin(-1)) / MAX_SYMBOL
    exps = step_exponents(torch.maximum(alpha * rms, peak))
    if native:
        symbols = planes_lib.quantize_rows(x, exp_steps(exps))
    else:
        x.div_(exp_steps(exps).unsqueeze(-1)).round_().clamp_(-MAX_SYMBOL, MAX_SYMBOL)
        symbols = torch.empty(x.shape, dtype=torch.int8).copy_(x)
    return Quantized(torch.empty(0), exps, refs.to(torch.uint8), symbols)


def _reconstruct_rows(q: Quantized, refs, mu) -> torch.Tensor:
    """The decoder's view of rows coded vs ZERO or MEAN (same ops as dequantize)."""
    steps = exp_steps(q.step_exps).unsqueeze(-1)
    with_mean = torch.addcmul(mu.unsqueeze(1), q.symbols.float(), steps)
    return torch.where((refs == REF_MEAN).unsqueeze(-1), with_mean, q.symbols.float() * steps)
