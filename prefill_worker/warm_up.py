"""One prefill and one encode per codec level when a prefill worker starts.

The first request used to pay for what a process does once: the engine's first
prefill (buffers, the native kernels' first calls) and each codec level's first
encode (tables, buffers, library loads). The warm-up does both on a chunk of
filler tokens before the worker takes requests.

The encoded sizes are thrown away, not given to the sender's LevelSet: filler KV
compresses unlike a real prompt's, and a level the sender never picks would keep a
wrong estimate. So the first real chunk is still measured at every level
(``ChunkSource.measure_sizes``), now without the one-off costs.
"""

from __future__ import annotations

import logging
import time

import torch

from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.transfer.levels import LevelSet

log = logging.getLogger(__name__)

_STRIDE = 7919
"""Filler token ids step through the vocabulary by a prime: no run of one token."""


def filler_tokens(num_tokens: int, vocab_size: int) -> list[int]:
    return [(1 + i * _STRIDE) % vocab_size for i in range(num_tokens)]


def warm_up(runner: ModelRunner, levels: LevelSet, num_tokens: int) -> float:
    """Prefill ``num_tokens`` filler tokens and encode their KV at every level of
    ``levels``; the blocks are freed, nothing is stored or sent. Returns seconds taken."""
    began = time.perf_counter()
    # at most half the context and half the block pool: the warm-up never crowds a request
    num_tokens = min(num_tokens, runner.max_model_len // 2,
                     runner.cache.num_blocks // 2 * runner.block_size)
    seq = Sequence("kvcluster-warm-up", filler_tokens(num_tokens, runner.arch.vocab_size))
    try:
        runner.allocate_blocks(seq, seq.num_tokens)
        with torch.inference_mode():
            runner.prefill(seq)
        kv = runner.cache.export_blocks(seq.block_table)[:, :, :num_tokens]  # [L, 2, T, H, D]
    finally:
        runner.free(seq)
    for name in levels.names:
        levels.codec(name).encode(kv.contiguous(), runner.layout, levels.hint_at(0))
    elapsed = time.perf_counter() - began
    log.info("warm-up: prefill of %d tokens and %d codec levels in %.3f s", num_tokens,
             len(levels.names), elapsed)
    return elapsed
