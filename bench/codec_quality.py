"""KV codec quality on SmolLM2 with real text, through our engine.

For every context (documents and multi-turn chats, 1k-4k tokens): prefill it,
export its KV, cast it to fp16 (the reference), then for every codec level
import that level's decoded KV into the same blocks and run the next 65 real
tokens as a cached-prefix prefill: 64 next-token predictions that all depend
on the decoded KV. Measured per level against the fp16 KV: perplexity change,
top-1 agreement, and whether greedy generation from the context is identical.

Every level is scored twice: as a chunk is coded with only its position
(``L0``), and with the encode hint the prefill worker gives by default
(``L0+hint``: the attention importance measured from the context's own last
queries, kvcluster/engine/attention_importance.py, and the chunk's
first/last-chunk flags; kvstore/codec/hint.py). The JSON's ``default_*`` keys
are the default level as the system codes it (with the hint while
``codec.attention_hint`` defaults to on).

    python -m bench.codec_quality [--quick] [--json FILE] [--chunk-tokens N] [--held-out]

``--chunk-tokens N`` codes each context as consecutive chunks of N tokens (as
the store and the transfer path do) instead of one chunk per context; the hints
are then per chunk (importance normalised over the whole context). ``--held-out``
scores 4 other texts that neither these contexts nor the profile's calibration
use (bench/codec_text.py HELD_OUT).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from bench.codec_text import TextContext, build_contexts, held_out_contexts
from bench.common import parse_args, print_table, write_json
from kvcluster.common.config import CodecConfig, EngineConfig
from kvstore.codec import chunk_hints, default_level, get_codec, level_names
from kvstore.codec.base import KVCodec
from kvstore.codec.hint import EncodeHint

CONTINUATION = 65  # 64 scored predictions
HINTED = "+hint"
"""Suffix of a level scored with the encode hint."""
GOAL_RATIO, GOAL_PPL_PCT, GOAL_TOP1 = 4.0, 1.0, 0.98
FULL_CONTEXTS = [("doc", 1024), ("chat", 1024), ("doc", 2048), ("chat", 2048),
                 ("doc", 4096), ("chat", 3072)]
QUICK_CONTEXTS = [("doc", 1024), ("chat", 1024)]


@dataclass
class Score:
    nll_sum: float
    predictions: torch.Tensor  # [64] argmax token ids
    greedy: list[int]


@dataclass
class LevelStats:
    bits: list[float] = field(default_factory=list)
    nll: float = 0.0
    ref_nll: float = 0.0
    agree: int = 0
    total: int = 0
    greedy_same: int = 0
    contexts: int = 0


class ContextProbe:
    """One prefilled context whose cached KV can be swapped and re-scored."""

    def __init__(self, runner, ctx: TextContext, greedy_tokens: int):
        from kvcluster.engine.attention_importance import prefill_with_importance
        from kvcluster.engine.sequence import Sequence

        self.runner, self.ctx, self.greedy_tokens = runner, ctx, greedy_tokens
        self.seq = Sequence("ctx", ctx.context_ids)
        logits, self.importance = prefill_with_importance(runner, self.seq)  # [L, T]
        self.first_token = int(logits.argmax())
        self.blocks = list(self.seq.block_table)
        self.kv = runner.cache.export_blocks(self.blocks)  # [L, 2, N, H, D] fp32

    def score(self, kv: torch.Tensor) -> Score:
        """Put ``kv`` in the context's blocks; score the continuation and greedy decode."""
        self.runner.cache.import_blocks(self.blocks, kv.to(self.kv.dtype))
        logits = self._run(self.ctx.continuation_ids, all_logits=True)[:-1]  # [64, V]
        targets = torch.tensor(self.ctx.continuation_ids[1:])
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        return Score(float(nll), logits.argmax(-1), self._greedy())

    def close(self) -> None:
        self.runner.free(self.seq)

    def _run(self, tokens: list[int], all_logits: bool):
        from kvcluster.engine.sequence import Sequence

        seq = self._attached(tokens)
        try:
            return self.runner.prefill(seq, all_logits=all_logits)
        finally:
            self.runner.free(seq)

    def _greedy(self) -> list[int]:
        seq = self._attached([self.first_token])
        try:
            out = [int(self.runner.prefill(seq).argmax())]
            for _ in range(self.greedy_tokens - 1):
                seq.append_token(out[-1])
                out.append(int(self.runner.decode_step([seq])[0].argmax()))
            return out
        finally:
            self.runner.free(seq)

    def _attached(self, tokens: list[int]):
        from kvcluster.engine.sequence import Sequence

        seq = Sequence("probe", self.ctx.context_ids + list(tokens))
        self.runner.blocks.share(self.blocks)
        seq.attach_cached(self.blocks, len(self.ctx.context_ids))
        return seq


def evaluate(runner, contexts: list[TextContext], codecs: dict[str, KVCodec],
             greedy_tokens: int, chunk_tokens: int = 0) -> dict[str, LevelStats]:
    """Score every codec on every context against the fp16 KV (in chunks if ``chunk_tokens``)."""
    layout16 = runner.layout.with_dtype("float16")
    stats = {name: LevelStats() for name in codecs}
    for ctx in contexts:
        probe = ContextProbe(runner, ctx, greedy_tokens)
        kv16 = probe.kv.to(torch.float16)
        ref = probe.score(kv16)
        for name, codec in codecs.items():
            importance = probe.importance if name.endswith(HINTED) else None
            decoded, num_bytes = round_trip(codec, kv16, layout16, chunk_tokens, importance)
            got = probe.score(decoded)
            _accumulate(stats[name], ref, got, num_bytes * 8 / kv16.numel())
        probe.close()
        print(f"  scored {ctx.kind} of {len(ctx.context_ids)} tokens ({ctx.source})", flush=True)
    return stats


def round_trip(codec: KVCodec, kv16: torch.Tensor, layout, chunk_tokens: int,
               importance: torch.Tensor | None = None):
    """(decoded KV, stream bytes) of the whole context, or of its chunks back to back.

    Without ``importance`` each chunk's hint is only its position (as the transfer
    path encodes); with ``importance [L, T]`` every chunk gets its full hint.
    """
    pieces = kv16.split(chunk_tokens, dim=2) if chunk_tokens else [kv16]
    hints = [EncodeHint(position=i * chunk_tokens) for i in range(len(pieces))] \
        if importance is None else chunk_hints(importance, chunk_tokens or kv16.shape[2])
    streams = [codec.encode(piece.contiguous(), layout, hint) for piece, hint in zip(pieces, hints)]
    decoded = torch.cat([codec.decode(s, layout) for s in streams], dim=2)
    return decoded, sum(len(s) for s in streams)


def summarize(stats: dict[str, LevelStats]) -> dict[str, dict]:
    int8_bits = _mean(stats["int8"].bits) if "int8" in stats else 8.0
    out = {}
    for name, s in stats.items():
        bits = _mean(s.bits)
        ppl_pct = 100 * (math.exp((s.nll - s.ref_nll) / s.total) - 1)
        out[name] = {
            "bits_per_element": bits,
            "ratio_vs_int8": int8_bits / bits,
            "ppl_increase_pct": ppl_pct,
            "top1_agreement": s.agree / s.total,
            "greedy_identical": s.greedy_same / s.contexts,
        }
        out[name]["meets_goal"] = _meets_goal(out[name])
    return out


def main(argv=None) -> dict:
    args = parse_args("KV codec quality on SmolLM2 with real text", argv, _extra_args)
    torch.manual_seed(0)
    runner, tokenizer = _load_model()
    lengths = QUICK_CONTEXTS if args.quick else FULL_CONTEXTS
    contexts = held_out_contexts(tokenizer, CONTINUATION, runner.block_size) if args.held_out \
        else build_contexts(tokenizer, lengths, CONTINUATION, runner.block_size)
    codecs = {name: get_codec(name) for name in level_names()}
    codecs.update({name + HINTED: get_codec(name) for name in level_names()[2:]})
    t0 = time.perf_counter()
    stats = evaluate(runner, contexts, codecs, 8 if args.quick else 32, args.chunk_tokens)
    levels = summarize(stats)
    result = _result(levels, contexts, time.perf_counter() - t0)
    result["chunk_tokens"] = args.chunk_tokens
    result["held_out"] = args.held_out
    _print(levels)
    write_json(args.json, result)
    return result


# ---------------------------------------------------------------- helpers


def _extra_args(parser) -> None:
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="code each context in chunks of this many tokens (0: one chunk)")
    parser.add_argument("--held-out", action="store_true",
                        help="score the 4 held-out texts (bench/codec_text.py HELD_OUT) instead")


def _load_model():
    from kvcluster.engine.models import resolve_model
    from kvcluster.engine.runner import ModelRunner
    from kvcluster.engine.tokenizer import Tokenizer

    folder = resolve_model("smollm2")
    config = EngineConfig(num_blocks=400, max_model_len=8192)
    return ModelRunner.from_pretrained(folder, dtype="float32", engine_config=config), \
        Tokenizer.from_pretrained(folder)


def _accumulate(s: LevelStats, ref: Score, got: Score, bits: float) -> None:
    s.bits.append(bits)
    s.nll += got.nll_sum
    s.ref_nll += ref.nll_sum
    s.agree += int((ref.predictions == got.predictions).sum())
    s.total += len(ref.predictions)
    s.greedy_same += int(ref.greedy == got.greedy)
    s.contexts += 1


def _meets_goal(level: dict) -> bool:
    return (level["ratio_vs_int8"] >= GOAL_RATIO and level["ppl_increase_pct"] <= GOAL_PPL_PCT
            and level["top1_agreement"] >= GOAL_TOP1)


def _quality_ok(level: dict) -> bool:
    return level["ppl_increase_pct"] <= GOAL_PPL_PCT and level["top1_agreement"] >= GOAL_TOP1


def _result(levels: dict, contexts: list[TextContext], seconds: float) -> dict:
    """``default_*``: the level as the system codes it by default (with the encode hint
    when ``codec.attention_hint`` defaults to on); ``default_with(out)_hint_*`` both ways."""
    default = default_level()
    hinted = CodecConfig().attention_hint and default + HINTED in levels
    shipped = default + HINTED if hinted else default
    lossy = [n for n in levels if n not in ("lossless", "int8")]
    quality_ok = [n for n in lossy if _quality_ok(levels[n])]
    smallest_ok = min(quality_ok, key=lambda n: levels[n]["bits_per_element"], default=None)
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute), our engine",
        "contexts": [{"kind": c.kind, "tokens": len(c.context_ids), "source": c.source}
                     for c in contexts],
        "levels": levels,
        "default_level": default,
        "default_attention_hint": bool(hinted),
        **_keys(levels.get(shipped), "default_"),
        **_keys(levels.get(default), "default_without_hint_"),
        **_keys(levels.get(default + HINTED), "default_with_hint_"),
        "levels_meeting_goal": [n for n in lossy if levels[n]["meets_goal"]],
        "smallest_level_meeting_quality": smallest_ok,
        "seconds": seconds,
    }


def _keys(level: dict | None, prefix: str) -> dict:
    if level is None:
        return {}
    return {prefix + key: level[key]
            for key in ("bits_per_element", "ratio_vs_int8", "ppl_increase_pct", "top1_agreement",
                        "greedy_identical")}


def _print(levels: dict) -> None:
    rows = [[name, v["bits_per_element"], v["ratio_vs_int8"], v["ppl_increase_pct"],
             v["top1_agreement"], v["greedy_identical"], "yes" if v["meets_goal"] else "no"]
            for name, v in levels.items()]
    print_table("KV codec quality vs fp16 KV (SmolLM2, real text)",
                ["level", "bits/elem", "x smaller than int8", "ppl +%", "top-1", "greedy same",
                 "meets goal"], rows)


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


if __name__ == "__main__":
    main()
