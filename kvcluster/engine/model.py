"""A Llama-family decoder (Llama, Qwen2) that reads and writes a paged KV cache.

Weights are stored fused for fewer, larger matmuls on the hot decode path
(``qkv = [q | k | v]``, ``gate_up = [gate | up]``) and transposed to
``[in_features, out_features]``: ``x @ w`` on a contiguous ``[in, out]`` matrix
runs faster than ``F.linear`` for the few-row inputs of CPU decoding.
Checkpoint tensors keep their Hugging Face names and are fused and transposed
in :meth:`LlamaModel.load_hf_weights`.

Every forward processes ``T`` new tokens of ``B`` sequences (``T = B * Q``):
a single-sequence prefill has ``B = 1, Q = T``; a decode step has ``Q = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvcluster.engine.arch import ModelArch
from kvcluster.engine.cpu_linear import can_pack, matmul, pack
from kvcluster.engine.paged_cache import PagedKVCache
from kvcluster.engine.rope import apply_rope, rope_tables
from kvcluster.engine.weights import check_hf_tensors


@dataclass
class ForwardBatch:
    """Where the new tokens' K/V go and which cached K/V they attend to."""

    positions: torch.Tensor
    """[T] long: absolute position of each new token."""
    slots: torch.Tensor
    """[T] long: cache slot (block_id * block_size + offset) of each new token."""
    num_seqs: int
    """B; the T new tokens are B sequences of Q = T // B tokens each."""
    block_tables: torch.Tensor | None = None
    """[B, num_blocks] long: blocks to attend to; None: attend only to the new tokens."""
    mask: torch.Tensor | None = None
    """[B, 1, Q, num_blocks * block_size] additive (0 or -inf), with block_tables."""
    decode_kv: torch.Tensor | None = None
    """Decode only: the contiguous KV mirror ``[L, 2, slots, H_kv, capacity, D]``
    (see :mod:`kvcluster.engine.decode_kv`), read instead of gathering blocks;
    then ``mask`` is ``[B, 1, 1, C]`` over its first C positions."""
    decode_kv_index: torch.Tensor | None = None
    """[B * H_kv] long: the new token's rows in a mirror layer's ``[2, -1, D]`` view."""
    packed_matmuls: bool = False
    """Use the packed weight copies if present (see :mod:`kvcluster.engine.cpu_linear`):
    faster for decode (and for a bf16 prefill on AMX), but fp32 rounding differs slightly
    from a plain matmul's, which an fp32 prefill keeps for exact parity with transformers."""
    grouped_mask: torch.Tensor | None = None
    """A cached-prefix prefill's ``mask`` repeated for each query head of a KV head
    ``[1, 1, group * Q, C]``; made once per forward by :class:`LlamaModel`."""
    query_tap: QueryTap | None = None
    """Prefill only: gets each layer's post-RoPE queries ``[T, H_q, D]``, in layer order
    (see :mod:`kvcluster.engine.attention_importance`); None: nothing is kept."""


class QueryTap(Protocol):
    """Anything that keeps (part of) the queries a forward computes, one call per layer."""

    def record(self, q: torch.Tensor) -> None: ...


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        hidden, inter = arch.hidden_size, arch.intermediate_size
        qkv_rows = arch.q_size + 2 * arch.kv_size
        make = lambda *shape: nn.Parameter(  # noqa: E731
            torch.empty(shape, dtype=dtype, device=device), requires_grad=False
        )
        self.input_norm = make(hidden)
        self.qkv = make(hidden, qkv_rows)  # [in, out], as every matrix below
        self.qkv_bias = make(qkv_rows) if arch.qkv_bias else None
        self.o_proj = make(arch.q_size, hidden)
        self.post_norm = make(hidden)
        self.gate_up = make(hidden, 2 * inter)
        self.down = make(inter, hidden)
        self.packed: dict[str, torch.Tensor] = {}
        """Optional packed copies of the matrices above (see cpu_linear), by attribute name."""


class LlamaModel(nn.Module):
    def __init__(
        self,
        arch: ModelArch,
        max_positions: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        device = torch.device(device)
        self.embed = nn.Parameter(
            torch.empty(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.layers = nn.ModuleList(
            DecoderLayer(arch, dtype, device) for _ in range(arch.num_layers)
        )
        self.norm = nn.Parameter(
            torch.empty(arch.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.lm_head = nn.Parameter(  # [hidden, vocab]; a transposed copy even when tied
            torch.empty(arch.hidden_size, arch.vocab_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.packed_lm_head: torch.Tensor | None = None
        cos, sin = rope_tables(arch, max_positions, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [P, D]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedKVCache,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``input_ids [T]``, writing their K/V into ``cache``.

        Args:
            logits_rows: [R] rows of T to compute logits for; None = all.
        Returns:
            fp32 logits ``[R, vocab]``.
        """
        x = self.embed[input_ids]  # [T, hidden]
        if batch.block_tables is not None and batch.mask.shape[2] > 1:  # cached-prefix prefill
            group = self.arch.num_heads // self.arch.num_kv_heads
            batch.grouped_mask = batch.mask.repeat(1, 1, group, 1)
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[batch.positions].unsqueeze(1)  # [T, 1, D]
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm)
            mirror = None if batch.decode_kv is None else batch.decode_kv[index]
            x = x + self._attention(layer, h, cos, sin, batch, cache.pool[index], mirror)
            h = self._rms_norm(x, layer.post_norm)
            x = x + self._mlp(layer, h, batch.packed_matmuls)
        if logits_rows is not None:
            x = x[logits_rows]  # [R, hidden]
        packed_lm_head = self.packed_lm_head if batch.packed_matmuls else None
        logits = matmul(self._rms_norm(x, self.norm), self.lm_head, packed_lm_head)
        return logits.float()  # [R, vocab]

    def pack_weights(self) -> bool:
        """Add packed weight copies for faster decode (CPU fp32, or bf16 with the native
        kernel; see cpu_linear).

        Returns:
            Whether the weights were packed.
        """
        if not can_pack(self.lm_head):
            return False
        for layer in self.layers:
            names = ("qkv", "o_proj", "gate_up", "down")
            layer.packed = {name: pack(getattr(layer, name)) for name in names}
        self.packed_lm_head = pack(self.lm_head)
        return True

    def load_hf_weights(self, get: Callable[[str], torch.Tensor], shapes: dict) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up.

        Args:
            get: name -> tensor (any dtype/device).
            shapes: name -> shape of every tensor the checkpoint holds; checked
                first, so a missing or mis-shaped tensor raises ValueError.
        """
        check_hf_tensors(self.arch, shapes)
        self.embed.copy_(get("model.embed_tokens.weight"))
        self.norm.copy_(get("model.norm.weight"))
        tied = self.arch.tie_word_embeddings
        self.lm_head.copy_(get("model.embed_tokens.weight" if tied else "lm_head.weight").T)
        for i, layer in enumerate(self.layers):
            self._load_layer(layer, f"model.layers.{i}.", get)

    # ------------------------------------------------------------------ private

    def _load_layer(self, layer: DecoderLayer, prefix: str, get: Callable) -> None:
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        layer.input_norm.copy_(get(prefix + "input_layernorm.weight"))
        layer.post_norm.copy_(get(prefix + "post_attention_layernorm.weight"))
        layer.qkv.copy_(torch.cat([get(f"{attn}{p}_proj.weight") for p in "qkv"]).T)
        if layer.qkv_bias is not None:
            layer.qkv_bias.copy_(torch.cat([get(f"{attn}{p}_proj.bias") for p in "qkv"]))
        layer.o_proj.copy_(get(attn + "o_proj.weight").T)
        gate_up = torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")])
        layer.gate_up.copy_(gate_up.T)
        layer.down.copy_(get(mlp + "down_proj.weight").T)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        eps = self.arch.rms_norm_eps
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps)
        # Half precision: normalise in fp32, scale in the model dtype (as transformers does).
        return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)

    def _mlp(self, layer: DecoderLayer, h: torch.Tensor, packed: bool) -> torch.Tensor:
        gate, up = self._mm(h, layer, "gate_up", packed).chunk(2, dim=-1)  # [T, I] each
        return self._mm(F.silu(gate) * up, layer, "down", packed)  # [T, hidden]

    def _mm(self, x: torch.Tensor, layer: DecoderLayer, name: str, packed: bool) -> torch.Tensor:
        return matmul(x, getattr(layer, name), layer.packed.get(name) if packed else None)

    def _attention(
        self,
        layer: DecoderLayer,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: torch.Tensor,
        mirror: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h [T, hidden] -> attention output [T, hidden].

        kv_cache is this layer's pool ``[2, num_blocks, block_size, H_kv, D]``;
        mirror, when decoding with one, this layer's ``[2, slots, H_kv, capacity, D]``.
        """
        arch = self.arch
        num_tokens, head_dim = h.shape[0], arch.head_dim
        qkv = self._mm(h, layer, "qkv", batch.packed_matmuls)  # [T, (H_q + 2 H_kv) * D]
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qk = qkv[:, : arch.q_size + arch.kv_size].view(num_tokens, -1, head_dim)
        qk = apply_rope(qk, cos, sin)  # [T, H_q + H_kv, D]
        q, k = qk[:, : arch.num_heads], qk[:, arch.num_heads :]
        v = qkv[:, arch.q_size + arch.kv_size :].view(num_tokens, -1, head_dim)
        if batch.query_tap is not None:
            batch.query_tap.record(q)
        new_kv = torch.stack((k, v))  # [2, T, H_kv, D]
        kv_cache.view(2, -1, *kv_cache.shape[3:]).index_copy_(1, batch.slots, new_kv)
        if mirror is not None:
            out = self._attend_decode_mirror(q, new_kv, mirror, batch)
        elif batch.block_tables is None:
            out = self._attend_new_tokens(q, k, v)
        elif batch.mask.shape[2] == 1:
            out = self._attend_decode(q, kv_cache, batch)
        else:
            out = self._attend_cached_prefix(q, kv_cache, batch)
        return self._mm(out.reshape(num_tokens, -1), layer, "o_proj", batch.packed_matmuls)

    def _attend_new_tokens(self, q, k, v) -> torch.Tensor:
        """One sequence, no cached prefix: plain causal attention. Returns [T, H_q, D]."""
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _attend_decode(self, q, kv_cache, batch: ForwardBatch) -> torch.Tensor:
        """One new token per sequence. q [B, H_q, D] -> [B, H_q, D].

        GQA without repeating K/V: the query heads sharing a KV head are laid
        out as that head's "query rows", q [B, H_kv, group, D].
        """
        num_seqs, num_kv_heads = batch.num_seqs, self.arch.num_kv_heads
        k, v = self._gather(kv_cache, batch)  # [B, H_kv, C, D] each
        q = q.reshape(num_seqs, num_kv_heads, -1, q.shape[-1])  # [B, H_kv, group, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask)
        return out.reshape(num_seqs, -1, q.shape[-1])

    def _attend_decode_mirror(self, q, new_kv, mirror, batch: ForwardBatch) -> torch.Tensor:
        """As :meth:`_attend_decode`, reading K/V as views of the contiguous mirror.

        new_kv [2, B, H_kv, D] is first written at each sequence's position.
        """
        num_seqs, num_kv_heads, head_dim = batch.num_seqs, self.arch.num_kv_heads, q.shape[-1]
        rows = mirror.view(2, -1, head_dim)  # [2, slots * H_kv * capacity, D]
        rows.index_copy_(1, batch.decode_kv_index, new_kv.view(2, -1, head_dim))
        context = batch.mask.shape[-1]
        keys, values = mirror[0, :num_seqs, :, :context], mirror[1, :num_seqs, :, :context]
        q = q.reshape(num_seqs, num_kv_heads, -1, head_dim)  # [B, H_kv, group, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask)
        return out.reshape(num_seqs, -1, head_dim)

    def _attend_cached_prefix(self, q, kv_cache, batch: ForwardBatch) -> torch.Tensor:
        """One sequence whose Q new tokens follow a cached prefix. q [Q, H_q, D] -> same.

        GQA as in :meth:`_attend_decode`: a KV head's query heads are its query rows
        ``[H_kv, group * Q, D]`` (faster than SDPA's enable_gqa; the same sums).
        """
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = self.arch.num_kv_heads
        group = num_heads // num_kv_heads
        k, v = self._gather(kv_cache, batch)  # [1, H_kv, C, D] each
        q = q.view(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(1, num_kv_heads, group * num_tokens, head_dim)  # [1, H_kv, group * Q, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.grouped_mask)
        out = out.view(num_kv_heads, group, num_tokens, head_dim).permute(2, 0, 1, 3)
        return out.reshape(num_tokens, num_heads, head_dim)

    def _gather(self, kv_cache, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every block in the block tables, each [B, H_kv, C, D]."""
        num_kv_heads, head_dim = kv_cache.shape[3:]
        # Whole blocks as flat rows: index_select copies rows far faster than
        # the [block_size, H_kv, D] sub-tensors of the 5-d view.
        flat = kv_cache.view(2, kv_cache.shape[1], -1)  # [2, num_blocks, block_size * H_kv * D]
        kv = flat.index_select(1, batch.block_tables.view(-1))  # [2, B*n, block_size*H_kv*D]
        kv = kv.view(2, batch.num_seqs, -1, num_kv_heads, head_dim).transpose(2, 3)
        return kv[0], kv[1]  # [B, H_kv, C, D]
