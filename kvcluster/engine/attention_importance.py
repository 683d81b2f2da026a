"""How much attention each context token gets, per layer, measured at prefill time.

The KV codec spends its bits where later queries will look (kvstore/codec/hint.py).
The profile can only *predict* that from a mean query; at prefill time the engine
has the real queries. The last ``window`` positions of the context are a cheap
proxy for the tokens that will follow it, so for each layer::

    a[h, i, t]    = softmax_t(q[h, i] . k[t] / sqrt(D))    causal: t <= position of query i
    importance[t] = sum over query heads h of mean over queries i of a[h, i, t]     ("mass", default)
                 or sum over h of mean over i of a[h, i, t]^2                         ("a2")

``a2`` is what the codec's mean-query prediction uses (a token's loss per unit
of noise grows with its attention weight squared), but the queries still to
come are not the last ones: on SmolLM2 the flatter ``mass`` placed the bits
better at equal KL, and 64 queries did as well as 32 or 128 (docs/codec.md,
"Design choices").

Usage (prefill worker)::

    logits, importance = prefill_with_importance(runner, seq)   # importance [L, num_tokens]
    hints = chunk_hints(importance, chunk_tokens)                # kvstore.codec.hint

Cost: ``window x num_tokens`` dot products per query head and layer, on the keys
already in the cache (measured numbers in docs/codec.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

AGGREGATIONS = ("a2", "mass")
DEFAULT_WINDOW = 64


@dataclass
class LastQueries:
    """A model QueryTap (kvcluster.engine.model) keeping each layer's last ``window`` queries."""

    window: int
    queries: list[torch.Tensor] = field(default_factory=list)
    """One ``[min(window, T), H_q, D]`` tensor per layer, post-RoPE, in layer order."""

    def record(self, q: torch.Tensor) -> None:
        self.queries.append(q[-self.window:].detach().float().clone())


@torch.inference_mode()
def prefill_with_importance(runner, seq, window: int = DEFAULT_WINDOW,
                            aggregation: str = "mass") -> tuple[torch.Tensor, torch.Tensor]:
    """``runner.prefill(seq)``, plus the attention importance of all of ``seq``'s tokens.

    Args:
        runner: a :class:`kvcluster.engine.runner.ModelRunner`.
        seq: as for ``runner.prefill`` (a cached prefix is fine: its keys are read
            from the cache; the queries are the last ``window`` computed tokens').
        window: how many trailing query positions to measure with (>= 1).
        aggregation: "mass" or "a2" (module docstring).
    Returns:
        (the prefill's logits ``[vocab]``, importance ``[num_layers, seq.num_tokens]`` float32).
    """
    _check_args(window, aggregation)
    tap = LastQueries(window)
    logits = runner.prefill(seq, query_tap=tap)
    queries = torch.stack(tap.queries)  # [L, W, H_q, D]
    keys = _cached_keys(runner.cache, seq.block_table, seq.num_tokens)  # [L, T, H_kv, D]
    return logits, attention_importance(queries, keys, aggregation)


def attention_importance(queries: torch.Tensor, keys: torch.Tensor,
                         aggregation: str = "mass") -> torch.Tensor:
    """Importance ``[L, T]`` of keys ``[L, T, H_kv, D]`` under the last queries ``[L, W, H_q, D]``.

    Query ``i`` sits at position ``T - W + i`` and sees the keys up to it.
    """
    _check_args(queries.shape[1], aggregation)
    num_layers, num_queries, num_q_heads = queries.shape[:3]
    num_tokens, num_kv_heads = keys.shape[1], keys.shape[2]
    if num_queries > num_tokens or num_q_heads % num_kv_heads:
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}")
    mask = _causal_mask(num_queries, num_tokens)  # [W, T]
    out = torch.empty(num_layers, num_tokens)
    for layer in range(num_layers):  # one layer's scores at a time: W x T x H_q floats
        out[layer] = _layer_importance(queries[layer], keys[layer].float(), mask, aggregation)
    return out


# ---------------------------------------------------------------- helpers


def _layer_importance(q, k, mask, aggregation: str) -> torch.Tensor:
    """q [W, H_q, D], k [T, H_kv, D] -> [T]."""
    num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    q = q.reshape(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [H_kv, G, W, D]
    scores = torch.matmul(q, k.permute(1, 2, 0).unsqueeze(1)) * head_dim ** -0.5  # [H_kv, G, W, T]
    weights = (scores + mask).softmax(-1)
    if aggregation == "a2":
        weights = weights.square()
    return weights.sum((0, 1)).mean(0)


def _causal_mask(num_queries: int, num_tokens: int) -> torch.Tensor:
    positions = torch.arange(num_tokens - num_queries, num_tokens)
    hidden = torch.arange(num_tokens)[None, :] > positions[:, None]
    return torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))


def _cached_keys(cache, block_table: list[int], num_tokens: int) -> torch.Tensor:
    """The sequence's keys ``[L, T, H_kv, D]`` straight from the pool (values are not needed)."""
    index = torch.tensor(block_table, dtype=torch.long, device=cache.pool.device)
    keys = cache.pool[:, 0].index_select(1, index)  # [L, n, block_size, H_kv, D]
    return keys.flatten(1, 2)[:, :num_tokens].cpu()


def _check_args(window: int, aggregation: str) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
