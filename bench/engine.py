"""Engine throughput on SmolLM2 (CPU, fp32): our paged engine vs transformers' generate.

Same process, same weights, same prompts, same thread count, greedy decoding
that does not stop at EOS, so both sides produce exactly ``new_tokens`` tokens
(64 with --quick, else 128), and the outputs are compared token for token.

Prompts: the demo's workload, a chat turn after the shared ~430-token system
prompt of :mod:`kvcluster.demo_text` (about 460 prompt tokens each), and, as a
second decode row, the same 8 questions without it (40-55 tokens: shorter
contexts, where per-step attention costs matter less).

* prefill: each prompt alone; our ``ModelRunner.prefill`` vs ``generate(max_new_tokens=1)``.
* decode, batch 1 and batch 8: the median duration of one decode step (one new
  token for every sequence of the batch). Ours: each ``LLMEngine.step`` after
  the prefill steps; transformers: the time between consecutive calls of a
  stopping criterion inside ``generate`` (default DynamicCache, eval mode,
  inference_mode; the batch left-padded to the longest prompt, as transformers
  requires). tok/s = batch size / median step.

Ratios > 1 mean we are faster. The two implementations alternate, and medians
(decode) or the best of ``repeats`` runs (prefill) are kept, so that background
load on a shared machine hits both alike. Besides wall-clock time, each step's
process CPU time is recorded (``*_cpu_vs_transformers``): on a machine with more
runnable threads than CPUs, wall time includes time spent descheduled, CPU time
does not. The load average is recorded too; ``--threads 1`` is the steadier
comparison on a busy machine (multi-threaded matmuls stall on descheduled threads).

    python -m bench.engine [--quick] [--json FILE] [--threads N]
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.common import parse_args, print_table, write_json
from kvcluster.common.config import EngineConfig
from kvcluster.common.sampling import SamplingParams
from kvcluster.demo_text import SYSTEM_PROMPT
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.models import resolve_model
from kvcluster.engine.runner import ModelRunner
from kvcluster.engine.sequence import Sequence
from kvcluster.engine.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, as if talking to a child who keeps asking why.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning, how did you sleep?' into Spanish and German.",
    "What does a paged KV cache do in an LLM inference server, and why does it help batching?",
    "Give me a Python one-liner that reverses a string.",
    "Summarise the plot of Romeo and Juliet in one short paragraph, without spoilers.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_flags)
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens, repeats = (64, 1) if args.quick else (128, 3)
    path = resolve_model("smollm2")
    tokenizer = Tokenizer.from_pretrained(path)
    system = {"role": "system", "content": SYSTEM_PROMPT}
    prompts = [tokenizer.encode_chat([system, {"role": "user", "content": q}]) for q in QUESTIONS]
    short = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours, theirs = _Ours(path), _Transformers(path)
    ours.warm_up(prompts[0])
    theirs.warm_up(prompts[0])

    rows, results = [], {"threads": torch.get_num_threads(), "new_tokens": new_tokens,
                         "prompt_tokens": [len(p) for p in prompts],
                         "short_prompt_tokens": [len(p) for p in short],
                         "load_average_start": os.getloadavg()[0]}
    _measure("prefill", rows, results, repeats,
             lambda: _prefill_rate(ours, prompts), lambda: _prefill_rate(theirs, prompts))
    b1_prompts = prompts[:2] if args.quick else prompts[:4]
    matches: list = []
    _measure_decode("decode_b1", rows, results, repeats, [[p] for p in b1_prompts],
                    new_tokens, ours, theirs, matches)
    _measure_decode("decode_b8", rows, results, repeats, [prompts], new_tokens,
                    ours, theirs, matches)
    _measure_decode("decode_b8_short_prompts", rows, results, repeats, [short], new_tokens,
                    ours, theirs, matches)
    results["greedy_outputs_equal"] = _pairs_equal(matches)
    results["load_average_end"] = os.getloadavg()[0]
    print_table(
        f"SmolLM2-135M fp32 on CPU ({results['threads']} threads), {new_tokens} new tokens",
        ["phase", "ours tok/s", "transformers tok/s", "ours / transformers",
         "CPU-time ratio"], rows,
    )
    print(f"greedy outputs equal to transformers': {results['greedy_outputs_equal']}; "
          f"1-min load average {results['load_average_start']:.1f} at start, "
          f"{results['load_average_end']:.1f} at end on {os.cpu_count()} CPUs")
    write_json(args.json, results)
    return 0


def _extra_flags(parser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


class _Ours:
    def __init__(self, path):
        config = EngineConfig(block_size=16, num_blocks=1024, max_batch_size=8, max_model_len=2048)
        self.runner = ModelRunner.from_pretrained(path, dtype="float32", engine_config=config)

    def warm_up(self, prompt):
        self.generate([prompt], 2)

    def prefill(self, prompt) -> float:
        seq = Sequence("prefill", prompt)
        start = time.perf_counter()
        int(self.runner.prefill(seq).argmax())
        elapsed = time.perf_counter() - start
        self.runner.free(seq)
        return elapsed

    def generate(self, batch, new_tokens) -> tuple[list[tuple], list[list[int]]]:
        """Returns ((wall, cpu) seconds of each decode step, outputs); a fresh engine: no prefix reuse across runs."""
        engine = LLMEngine(self.runner, stop_on_eos=False)
        params = SamplingParams(max_new_tokens=new_tokens)
        for i, prompt in enumerate(batch):
            engine.add_request(str(i), prompt, params)
        while engine.waiting:
            engine.step()
        steps = []
        while engine.has_unfinished():
            start = _clock()
            engine.step()
            steps.append(_minus(_clock(), start))
        return steps, [engine.pop(str(i)).output_ids for i in range(len(batch))]


class _Transformers:
    def __init__(self, path):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        # Never stop at EOS (and never suppress it, as min_new_tokens would): like ours.
        self.model.generation_config.eos_token_id = None

    def warm_up(self, prompt):
        self._run([prompt], 2)

    def prefill(self, prompt) -> float:
        start = time.perf_counter()
        self._run([prompt], 1)
        return time.perf_counter() - start

    def generate(self, batch, new_tokens) -> tuple[list[tuple], list[list[int]]]:
        stamps: list[tuple[float, float]] = []
        outputs = self._run(batch, new_tokens, stamps)
        return [_minus(b, a) for a, b in zip(stamps, stamps[1:])], outputs

    @torch.inference_mode()
    def _run(self, batch, new_tokens, stamps: list[float] | None = None) -> list[list[int]]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Clock(StoppingCriteria):  # called once per generated token
            def __call__(self, input_ids, scores, **kwargs):
                if stamps is not None:
                    stamps.append(_clock())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        width = max(len(p) for p in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([_Clock()]),
        )
        return out[:, width:].tolist()


def _prefill_rate(impl, prompts) -> float:
    return sum(len(p) for p in prompts) / sum(impl.prefill(p) for p in prompts)


def _decode_steps(impl, batches, new_tokens, matches) -> list[tuple[float, float]]:
    """Per-step (wall, CPU) seconds of generating ``new_tokens`` for each batch (same size)."""
    steps = []
    for batch in batches:
        durations, outputs = impl.generate(batch, new_tokens)
        assert len(durations) == new_tokens - 1, len(durations)
        steps += durations
        matches.append((type(impl).__name__, len(batch), outputs))
    return steps


def _measure_decode(name, rows, results, repeats, batches, new_tokens, ours, theirs, matches):
    ours_steps, theirs_steps = [], []
    for _ in range(repeats):
        ours_steps += _decode_steps(ours, batches, new_tokens, matches)
        theirs_steps += _decode_steps(theirs, batches, new_tokens, matches)
    batch_size = len(batches[0])
    wall = [batch_size / statistics.median(s[0] for s in steps)
            for steps in (ours_steps, theirs_steps)]
    cpu = [statistics.median(s[1] for s in steps) for steps in (ours_steps, theirs_steps)]
    results[f"{name}_cpu_ms_per_step"] = 1e3 * cpu[0]
    results[f"{name}_transformers_cpu_ms_per_step"] = 1e3 * cpu[1]
    results[f"{name}_cpu_vs_transformers"] = cpu[1] / cpu[0]
    results[f"{name}_step_ms_quartiles"] = _quartiles(ours_steps)
    results[f"{name}_transformers_step_ms_quartiles"] = _quartiles(theirs_steps)
    _record(name, rows, results, *wall, cpu_ratio=cpu[1] / cpu[0])


def _quartiles(steps) -> list[float]:
    """Wall-clock step quartiles in ms: the spread behind the medians."""
    return [round(1e3 * q, 2) for q in statistics.quantiles([s[0] for s in steps], n=4)]


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds now."""
    return time.perf_counter(), time.process_time()


def _minus(end: tuple[float, float], start: tuple[float, float]) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def _measure(name, rows, results, repeats, ours_fn, theirs_fn) -> None:
    ours, theirs = 0.0, 0.0
    for _ in range(repeats):
        ours, theirs = max(ours, ours_fn()), max(theirs, theirs_fn())
    _record(name, rows, results, ours, theirs)


def _record(name, rows, results, ours, theirs, cpu_ratio=None) -> None:
    results[f"{name}_tok_s"] = ours
    results[f"{name}_transformers_tok_s"] = theirs
    results[f"{name}_vs_transformers"] = ours / theirs
    rows.append([name, ours, theirs, ours / theirs, "" if cpu_ratio is None else cpu_ratio])


def _pairs_equal(matches) -> float:
    """Fraction of sequences whose greedy tokens equal transformers' (same batch shape)."""
    ours = [(b, o) for name, b, outs in matches if name == "_Ours" for o in outs]
    theirs = [(b, o) for name, b, outs in matches if name == "_Transformers" for o in outs]
    pairs = list(zip(ours, theirs))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


if __name__ == "__main__":
    raise SystemExit(main())
