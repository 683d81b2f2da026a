"""The model runner: ``prefill()`` and ``decode_step()`` over the paged KV cache.

It owns the model, the cache pool and the pool's one :class:`BlockManager`
(``runner.blocks``: every block is got and freed there). It computes; it does not
schedule (see :mod:`kvcluster.engine.llm_engine`). Both workers use it: the prefill
worker calls ``prefill`` then ``cache.export_blocks``; the decode worker allocates
blocks through ``blocks``, fills them with ``cache.import_blocks``, then
``Sequence.attach_cached`` and ``prefill`` (which computes only the uncached suffix)
and ``decode_step``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvcluster.common.config import EngineConfig
from kvcluster.common.layout import KVLayout
from kvcluster.engine import small_gemm
from kvcluster.engine.arch import ModelArch
from kvcluster.engine.block_manager import BlockManager
from kvcluster.engine.decode_kv import DecodeKVMirror
from kvcluster.engine.dtypes import dtype_name
from kvcluster.engine.hf_loader import load_hf_checkpoint
from kvcluster.engine.model import ForwardBatch, LlamaModel, QueryTap
from kvcluster.engine.models import default_model_id, resolve_model
from kvcluster.engine.paged_cache import PagedKVCache
from kvcluster.engine.placement import resolve_device, resolve_dtype
from kvcluster.engine.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        arch: ModelArch,
        model: LlamaModel,
        engine_config: EngineConfig | None = None,
        model_id: str = "",
    ):
        self.arch = arch
        self.model = model
        self.config = engine_config or EngineConfig()
        self.model_id = model_id
        self.device = model.embed.device
        self.max_model_len = min(self.config.max_model_len, arch.max_position_embeddings)
        self.layout = KVLayout(
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            block_size=self.config.block_size,
            dtype=dtype_name(model.dtype),
        )
        self.cache = PagedKVCache(self.layout, self.config.num_blocks, self.device)
        self.blocks = BlockManager(self.config.num_blocks)
        self.decode_kv = (DecodeKVMirror(self.cache, self.max_model_len)
                          if self.config.decode_kv_mirror else None)
        self.packed_prefill = False
        """Prefill through the packed weights too: bf16 on AMX tiles, where a prompt's
        rows cost about one pass over the weights (fp32 keeps plain matmuls, which give
        exactly transformers' logits)."""
        if self.config.cpu_packed_weights and model.pack_weights():
            small_gemm.set_num_threads(self.config.native_threads or _num_cores())
            self.packed_prefill = model.dtype == torch.bfloat16 and small_gemm.amx_available()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        engine_config: EngineConfig | None = None,
        model_id: str | None = None,
    ) -> "ModelRunner":
        """Load a Hugging Face folder (or a name ``kvcluster.engine.models`` resolves).

        ``dtype`` and ``device`` may be "auto" (kvcluster/engine/placement.py)."""
        config = engine_config or EngineConfig()
        folder = _resolve_folder(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        arch, model = load_hf_checkpoint(folder, dtype, device, config.max_model_len)
        return cls(arch, model, config, model_id or default_model_id(folder))

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def prefill(self, seq: Sequence, all_logits: bool = False,
                query_tap: QueryTap | None = None) -> torch.Tensor:
        """Compute the KV of ``seq``'s uncomputed tokens, attending to its cached prefix.

        If every token is already cached, the last one is recomputed (its slot
        is rewritten) so there are logits to return. ``query_tap``, if given,
        sees every layer's queries of the computed tokens (attention_importance.py).

        Returns:
            fp32 logits of the last position ``[vocab]``, or with ``all_logits``
            of every computed position ``[num_new_tokens, vocab]``.
        Raises:
            ValueError: the sequence is longer than max_model_len or the pool.
            OutOfBlocksError: not enough free blocks right now.
        """
        self.check_fits(seq)
        if seq.num_computed_tokens > len(seq.block_table) * self.block_size:
            raise ValueError(
                f"request {seq.request_id!r}: {seq.num_computed_tokens} cached tokens but only "
                f"{len(seq.block_table)} blocks of {self.block_size} attached"
            )
        start = min(seq.num_computed_tokens, seq.num_tokens - 1)
        self.allocate_blocks(seq, seq.num_tokens)
        self._forget_decode_kv(seq)
        positions = torch.arange(start, seq.num_tokens, device=self.device)  # [Q]
        input_ids = torch.tensor(seq.token_ids[start:], device=self.device)  # [Q]
        batch = ForwardBatch(positions, self._slots(seq.block_table, positions), num_seqs=1,
                             query_tap=query_tap, packed_matmuls=self.packed_prefill)
        if start > 0:
            num_blocks = self._num_blocks(seq.num_tokens)
            batch.block_tables = torch.tensor([seq.block_table[:num_blocks]], device=self.device)
            batch.mask = self._causal_mask(positions, num_blocks * self.block_size)[None, None]
        rows = None if all_logits else torch.tensor([len(positions) - 1], device=self.device)
        logits = self.model(input_ids, batch, self.cache, rows)  # [Q or 1, vocab]
        seq.num_computed_tokens = seq.num_tokens
        return logits if all_logits else logits[0]

    def decode_step(self, seqs: list[Sequence]) -> torch.Tensor:
        """Advance a ragged batch by one token: each ``seq``'s last token is computed.

        Every sequence must have exactly one uncomputed token (the one sampled
        after its previous step).

        Returns:
            fp32 logits ``[B, vocab]``, row i for ``seqs[i]``.
        """
        for seq in seqs:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                raise ValueError(
                    f"request {seq.request_id!r}: decode_step needs exactly one new token, "
                    f"has {seq.num_tokens - seq.num_computed_tokens}"
                )
            self.check_fits(seq)
            self.allocate_blocks(seq, seq.num_tokens)
        positions_list = [seq.num_computed_tokens for seq in seqs]
        positions = torch.tensor(positions_list, device=self.device)  # [B]
        if self.decode_kv is not None:
            batch = self._mirror_batch(seqs, positions_list, positions)
        else:
            batch = self._gather_batch(seqs, positions_list, positions)
        input_ids = torch.tensor([seq.token_ids[-1] for seq in seqs], device=self.device)
        logits = self.model(input_ids, batch, self.cache)  # [B, vocab]
        for seq in seqs:
            seq.num_computed_tokens += 1
        return logits

    def allocate_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_tokens`` tokens (OutOfBlocksError if full)."""
        missing = self._num_blocks(num_tokens) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.blocks.allocate(missing))

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s reference to each of its blocks."""
        self._forget_decode_kv(seq)
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def check_fits(self, seq: Sequence) -> None:
        """ValueError if ``seq`` is longer than the context or than the whole pool."""
        if seq.num_tokens > self.max_model_len:
            raise ValueError(
                f"request {seq.request_id!r}: {seq.num_tokens} tokens exceed the "
                f"context length max_model_len={self.max_model_len}"
            )
        if self._num_blocks(seq.num_tokens) > self.cache.num_blocks:
            raise ValueError(
                f"request {seq.request_id!r}: {seq.num_tokens} tokens need "
                f"{self._num_blocks(seq.num_tokens)} KV blocks, "
                f"the pool has {self.cache.num_blocks}"
            )

    # ------------------------------------------------------------------ private

    def _mirror_batch(self, seqs, positions_list, positions) -> ForwardBatch:
        """Decode batch reading K/V from the contiguous mirror (slot i = seqs[i])."""
        assert self.decode_kv is not None
        write_index = self.decode_kv.prepare(seqs)  # [B * H_kv]
        return ForwardBatch(
            positions=positions,
            slots=self._decode_slots(seqs, positions_list),  # [B]
            num_seqs=len(seqs),
            mask=self._causal_mask(positions, max(positions_list) + 1)[:, None, None],  # [B,1,1,C]
            decode_kv=self.decode_kv.buffer,
            decode_kv_index=write_index,
            packed_matmuls=True,
        )

    def _gather_batch(self, seqs, positions_list, positions) -> ForwardBatch:
        """Decode batch gathering every block of the block tables in every layer."""
        num_blocks = self._num_blocks(max(positions_list) + 1)
        tables = [_padded(seq.block_table, p // self.block_size + 1, num_blocks)
                  for seq, p in zip(seqs, positions_list)]
        return ForwardBatch(
            positions=positions,
            slots=self._decode_slots(seqs, positions_list),  # [B]
            num_seqs=len(seqs),
            block_tables=torch.tensor(tables, device=self.device),  # [B, n]
            mask=self._causal_mask(positions, num_blocks * self.block_size)[:, None, None],
            packed_matmuls=True,
        )

    def _decode_slots(self, seqs, positions_list) -> torch.Tensor:
        """Cache slot of each sequence's new token ``[B]``."""
        size = self.block_size
        slots = [seq.block_table[p // size] * size + p % size for seq, p in zip(seqs, positions_list)]
        return torch.tensor(slots, device=self.device)

    def _forget_decode_kv(self, seq: Sequence) -> None:
        if self.decode_kv is not None:
            self.decode_kv.drop(seq)

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _slots(self, block_table: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Cache slot of each position ``[T]``."""
        table = torch.tensor(block_table, device=self.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _causal_mask(self, positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """Additive mask ``[T, num_keys]``: 0 where key j <= position, else -inf.

        Additive rather than bool so attention does not convert it in every layer.
        """
        keys = torch.arange(num_keys, device=self.device)
        hidden = keys[None, :] > positions[:, None]
        mask = torch.zeros(hidden.shape, dtype=self.model.dtype, device=self.device)
        return mask.masked_fill_(hidden, float("-inf"))


def _padded(block_table: list[int], num_used: int, width: int) -> list[int]:
    """The first ``num_used`` blocks, padded with block 0 (masked out) to ``width``."""
    return block_table[:num_used] + [0] * (width - num_used)


def _num_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's cpuset, say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _resolve_folder(path: str | Path) -> Path:
    """A Hugging Face folder, a .gguf file (converted once) or "smollm2"."""
    return Path(resolve_model(path))
