"""Calibrate the codec's model profile (kvstore/codec/profile.py) for SmolLM2 on real text.

Two measurements on calibration texts that the quality bench does not use
(bench/codec_text.py sources, other offsets and topics):

* the **mean post-RoPE query** of every (layer, query head) over all positions;
* the **Fisher information** of the next 64 real tokens' log-likelihood with
  respect to every element of the context's KV (diagonal, from gradients of
  sampled continuations): ``E[KL] ~= 1/2 * sum_i F_i * err_i^2``.

With the codec's own row scales (allocation.py, plane scales left at 1), each
plane's noise weight is ``W_p = sum F * (row scale * rms)^2``; for an
entropy-coded uniform quantizer the bits are minimised at a fixed expected KL
when the steps go as ``W_p^-1/2`` (high-rate theory), so the plane scales are
``W_p^-1/2`` (geometric mean over texts, normalised to geometric mean 1).

It also fits the transform stage (kvstore/codec/transform.py): each plane's
principal axes (eigenvectors of the rows' covariance about each 1024-token
chunk's mean, keys rotated back to pre-RoPE first), largest first.
``--bases-only`` refits just those (a minute, no gradients) and keeps the
profile's scales and queries.

    python -m bench.codec_calibrate [--quick] [--samples N] [--out FILE] [--bases-only]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.codec_text import chat_text, documents
from kvcluster.common.layout import KVLayout
from kvcluster.engine.rope import apply_rope, inv_frequencies
from kvstore.codec.allocation import row_scales
from kvstore.codec.profile import PROFILE_DIR, PROFILES, ModelProfile, read_arrays, save_profile
from kvstore.codec.transform import rotate_keys

CONTINUATION = 65
BASIS_CHUNK_TOKENS = 1024
"""Rows are centred on their chunk's mean, as the codec centres them."""
CALIBRATION = [("doc", 3, 0, 1024), ("doc", 1, 20000, 2048), ("chat", 36, 0, 1024),
               ("chat", 48, 0, 1024), ("doc", 0, 30000, 1024)]
"""(kind, document index or first chat topic, first token, tokens): none overlaps the
contexts of bench/codec_quality.py (documents 0-2 from token 0, chats from topics 0-35)."""


def main(argv=None) -> ModelProfile:
    args = _parse(argv)
    torch.manual_seed(0)
    model, tokenizer = _load_model()
    arch = model.arch
    layout = KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, 16, "float16")
    shipped = PROFILE_DIR / PROFILES[(arch.num_layers, arch.num_kv_heads, arch.head_dim)]
    queries, measured = [], []
    for ids in _calibration_ids(tokenizer, args.quick):
        start = time.perf_counter()
        context, continuation = ids[:-CONTINUATION], ids[-CONTINUATION:]
        kv, query_sum = context_kv(model, context)
        queries.append(query_sum / len(context))
        fisher = None if args.bases_only else fisher_diagonal(model, kv, continuation, args.samples)
        measured.append((kv, fisher))
        print(f"  {len(context)} tokens: {time.perf_counter() - start:.0f} s", flush=True)
    inv_freq = inv_frequencies(arch)
    bases = plane_bases([kv for kv, _ in measured], inv_freq, arch.num_kv_heads)
    if args.bases_only:
        stored = read_arrays(shipped)
        plane_scales, mean_query = stored["plane_scales"], stored["mean_query"]
    else:
        mean_query = torch.stack(queries).mean(0)
        unit = ModelProfile("unit", torch.ones(2 * arch.num_layers), mean_query)
        weights = torch.stack([plane_weights(kv, fisher, layout, unit) for kv, fisher in measured])
        plane_scales = _normalise(weights.log().mean(0).exp().rsqrt())
    out = Path(args.out or shipped)
    save_profile(out, plane_scales, mean_query, bases, inv_freq)
    print(f"wrote {out}\nK scales: {plane_scales[0::2].tolist()}\nV scales: {plane_scales[1::2].tolist()}")
    return ModelProfile(out.stem, plane_scales, mean_query)


def plane_bases(kvs: list[torch.Tensor], inv_freq: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Each plane's principal axes ``[P, C, C]`` (columns, largest variance first) over
    contexts ``kvs`` (each ``[L, 2, T, H, D]`` from position 0), keys pre-RoPE."""
    num_layers, _, _, heads, dim = kvs[0].shape
    channels = heads * dim
    cov = torch.zeros(2 * num_layers, channels, channels, dtype=torch.float64)
    for kv in kvs:
        planes = kv.reshape(2 * num_layers, kv.shape[2], channels).float().clone()
        rotate_keys(planes, 0, inv_freq, num_kv_heads, inverse=True)
        for chunk in planes.split(BASIS_CHUNK_TOKENS, dim=1):
            rows = (chunk - chunk.mean(1, keepdim=True)).double()
            cov += rows.transpose(1, 2) @ rows
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vectors.flip(-1).float()


def context_kv(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's KV ``[L, 2, T, H, D]`` (fp16 values) and its queries summed over tokens."""
    with torch.no_grad():
        kv, query_sum = [], []
        forward(model, ids, None, 0, kv_out=kv, query_sums=query_sum)
    return torch.stack(kv).half().float(), torch.stack(query_sum)


def fisher_diagonal(model, kv: torch.Tensor, continuation: list[int], samples: int) -> torch.Tensor:
    """E_y[(d log p(y) / d kv)^2] over ``samples`` continuations sampled from the model."""
    past = kv.clone().requires_grad_()
    log_probs = forward(model, continuation, past, kv.shape[2])[:-1].log_softmax(-1)
    probs = log_probs.detach().exp()
    fisher = torch.zeros_like(kv)
    for i in range(samples):
        sampled = log_probs.gather(-1, torch.multinomial(probs, 1)).sum()
        (grad,) = torch.autograd.grad(sampled, past, retain_graph=i < samples - 1)
        fisher += grad.square() / samples
    return fisher


def plane_weights(kv: torch.Tensor, fisher: torch.Tensor, layout: KVLayout,
                  unit: ModelProfile) -> torch.Tensor:
    """Each plane's Fisher-weighted noise ``[2L]`` under ``unit`` (plane scales 1), mean 1."""
    num_layers, _, num_tokens = kv.shape[:3]
    x = kv.reshape(2 * num_layers, num_tokens, -1)  # [P, T, C]
    residual = x - x.mean(1, keepdim=True)
    residual = torch.where((x.square().sum(-1) < residual.square().sum(-1)).unsqueeze(-1), x, residual)
    step = row_scales(x, layout, unit) * residual.square().mean(-1).sqrt()  # [P, T]
    noise = (fisher.reshape(x.shape) * step.unsqueeze(-1).square())[:, 1:].sum((1, 2))
    return noise / noise.mean()


def forward(model, ids, past, start, kv_out=None, query_sums=None) -> torch.Tensor:
    """Differentiable Llama forward of ``ids`` after ``past [L, 2, T, H, D]`` -> logits."""
    arch, num_new, dim = model.arch, len(ids), model.arch.head_dim
    positions = torch.arange(start, start + num_new)
    cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)
    x = model.embed[torch.tensor(ids)]
    mask = torch.zeros(num_new, start + num_new)
    mask[:, start:] = torch.full((num_new, num_new), float("-inf")).triu(1)
    for index, layer in enumerate(model.layers):
        h = F.rms_norm(x, layer.input_norm.shape, layer.input_norm, arch.rms_norm_eps)
        qkv = h @ layer.qkv
        qk = apply_rope(qkv[:, : arch.q_size + arch.kv_size].view(num_new, -1, dim), cos, sin)
        q, k = qk[:, : arch.num_heads], qk[:, arch.num_heads:]
        v = qkv[:, arch.q_size + arch.kv_size:].view(num_new, -1, dim)
        if kv_out is not None:
            kv_out.append(torch.stack([k, v]))
            query_sums.append(q.sum(0))
        if past is not None:
            k, v = torch.cat([past[index, 0], k]), torch.cat([past[index, 1], v])
        heads = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, attn_mask=mask, enable_gqa=True)
        x = x + out[0].transpose(0, 1).reshape(num_new, -1) @ layer.o_proj
        h = F.rms_norm(x, layer.post_norm.shape, layer.post_norm, arch.rms_norm_eps)
        gate, up = (h @ layer.gate_up).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ layer.down
    return F.rms_norm(x, model.norm.shape, model.norm, arch.rms_norm_eps) @ model.lm_head


# ---------------------------------------------------------------- helpers

def _calibration_ids(tokenizer, quick: bool) -> list[list[int]]:
    docs = documents()
    out = []
    for kind, which, first, length in CALIBRATION[:2 if quick else None]:
        text = docs[which][1] if kind == "doc" else chat_text(tokenizer, which)
        out.append(tokenizer.encode(text)[first:first + length + CONTINUATION])
    return out


def _normalise(scales: torch.Tensor) -> torch.Tensor:
    return scales / scales.log().mean().exp()


def _load_model():
    from kvcluster.engine.models import resolve_model
    from kvcluster.engine.runner import ModelRunner
    from kvcluster.engine.tokenizer import Tokenizer

    folder = resolve_model("smollm2")
    runner = ModelRunner.from_pretrained(folder, dtype="float32")
    return runner.model, Tokenizer.from_pretrained(folder)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 calibration texts instead of 5")
    parser.add_argument("--samples", type=int, default=16, help="sampled continuations per text")
    parser.add_argument("--out", default="", help="profile file (default: the shipped one)")
    parser.add_argument("--bases-only", action="store_true",
                        help="refit only the transform bases; keep the profile's scales and queries")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
