"""A contiguous copy of the decoding sequences' KV, so decode attention reads views.

The paged pool stays the source of truth (export, prefix sharing, prefill). For
a decode batch, attention needs each sequence's K and V as ``[H_kv, C, D]``;
gathering its blocks from the pool copies the whole context in every layer of
every step. This mirror keeps them laid out contiguously instead, one *slot*
per sequence of the batch, in batch order::

    buffer [L, 2 (K, V), num_slots, H_kv, capacity, D]
    slot i = seqs[i]; tokens [0, lengths[i]) valid, the rest masked out

so a layer's K is the view ``buffer[l, 0, :B, :, :C]``. Each step the model
writes the new token's K/V into both the pool and the mirror (one
``index_copy_`` each). A sequence is (re)copied from the pool only when it joins
the batch, moves to another slot, or its mirrored length disagrees with its
``num_computed_tokens`` (e.g. after a preemption or a failed step), so the
mirror can never serve stale KV to a correctly tracked sequence.
"""

from __future__ import annotations

import torch

from kvcluster.engine.paged_cache import PagedKVCache
from kvcluster.engine.sequence import Sequence

GROW_TOKENS = 256
"""Capacity grows in steps of this many tokens (each growth copies the mirror once)."""


class DecodeKVMirror:
    def __init__(self, cache: PagedKVCache, max_tokens: int):
        """
        Args:
            max_tokens: the longest sequence (max_model_len): caps the capacity.
        """
        self.cache = cache
        self.max_tokens = max_tokens
        self.buffer: torch.Tensor | None = None
        """[L, 2, num_slots, H_kv, capacity, D], or None while no sequence decodes."""
        self._seqs: list[Sequence | None] = []
        self._lengths: list[int] = []

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[4]

    def prepare(self, seqs: list[Sequence]) -> torch.Tensor:
        """Make slot i hold the KV of ``seqs[i]``'s first ``num_computed_tokens`` tokens,
        with room for one more (the token this step computes).

        Returns:
            ``write_index [B * H_kv]`` long: where each (sequence, KV head) row of
            the new token goes in ``buffer[l, kv]`` viewed as ``[slots * H_kv * capacity, D]``.
        """
        lengths = [seq.num_computed_tokens for seq in seqs]
        self._ensure_room(len(seqs), max(lengths) + 1)
        for slot, seq in enumerate(seqs):
            if not (self._seqs[slot] is seq and self._lengths[slot] == lengths[slot]):
                self._drop(seq)
                self._fill(slot, seq, lengths[slot])
        for slot, length in enumerate(lengths):
            self._lengths[slot] = length + 1
        return self._write_index(lengths)

    def drop(self, seq: Sequence) -> None:
        """Forget ``seq`` (freed, or its KV recomputed); release memory once empty."""
        self._drop(seq)
        if all(s is None for s in self._seqs):
            self.buffer, self._seqs, self._lengths = None, [], []

    # ------------------------------------------------------------------ private

    def _drop(self, seq: Sequence) -> None:
        for slot, held in enumerate(self._seqs):
            if held is seq:
                self._seqs[slot], self._lengths[slot] = None, 0

    def _ensure_room(self, num_slots: int, num_tokens: int) -> None:
        """Grow the buffer (keeping its contents) to at least these sizes."""
        if num_slots <= len(self._seqs) and num_tokens <= self.capacity:
            return
        capacity = max(self.capacity, min(-(-num_tokens // GROW_TOKENS) * GROW_TOKENS,
                                          max(self.max_tokens, num_tokens)))
        slots = max(num_slots, len(self._seqs))
        pool = self.cache.pool  # [L, 2, blocks, block_size, H_kv, D]
        layers, _, _, _, heads, dim = pool.shape
        # zeros, not empty: masked-out keys still meet attention's P @ V (0 * NaN = NaN)
        buffer = torch.zeros((layers, 2, slots, heads, capacity, dim),
                             dtype=pool.dtype, device=pool.device)
        if self.buffer is not None:
            old_slots, old_capacity = self.buffer.shape[2], self.buffer.shape[4]
            buffer[:, :, :old_slots, :, :old_capacity] = self.buffer
        self.buffer = buffer
        self._seqs += [None] * (slots - len(self._seqs))
        self._lengths += [0] * (slots - len(self._lengths))

    def _fill(self, slot: int, seq: Sequence, num_tokens: int) -> None:
        """Copy ``seq``'s first ``num_tokens`` tokens of KV from the pool into ``slot``."""
        assert self.buffer is not None
        block_size = self.cache.block_size
        num_blocks = -(-num_tokens // block_size)
        index = torch.tensor(seq.block_table[:num_blocks], device=self.buffer.device)
        blocks = self.cache.pool.index_select(2, index)  # [L, 2, n, block_size, H_kv, D]
        tokens = blocks.flatten(2, 3)[:, :, :num_tokens]  # [L, 2, num_tokens, H_kv, D]
        self.buffer[:, :, slot, :, :num_tokens] = tokens.transpose(2, 3)
        self._seqs[slot], self._lengths[slot] = seq, num_tokens

    def _write_index(self, positions: list[int]) -> torch.Tensor:
        assert self.buffer is not None
        heads, capacity = self.buffer.shape[3], self.buffer.shape[4]
        device = self.buffer.device
        slots = torch.arange(len(positions), device=device)[:, None]  # [B, 1]
        rows = slots * heads + torch.arange(heads, device=device)[None, :]  # [B, H_kv]
        position = torch.tensor(positions, device=device)[:, None]  # [B, 1]
        return (rows * capacity + position).view(-1)  # [B * H_kv]
