"""A chat's later turn in the engine alone: the prefill step of a short uncached tail
after a long cached prefix (SmolLM2, the engine's dtype, torch at one thread as in a
Ray actor).

The demo workload's later turns find ~512 of ~530 prompt tokens in the decode
engine's own blocks, so their first token is one ``LLMEngine.step`` that prefills a
17-50-token tail attending to ~530 tokens (``first_decode_step`` in bench.serve).
This measures that step for tails of 17, 33 and 50 tokens, two ways in the same
process on the same weights:

* ``packed``: the engine's default (``ModelRunner.packed_prefill``: bf16 matmuls on
  the native kernel's AMX path, its own threads);
* ``plain``: torch's ``x @ w`` for the prefill matmuls (the engine before AMX).

The two alternate request by request, so background load hits both alike; medians
of wall and process CPU time are kept, with the load average. Each step's greedy
first token is compared between the two. A decode step (one token, same context)
is timed too: the packed path must not slow it.

    python -m bench.engine_tail [--quick] [--json FILE] [--threads N]
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.common import parse_args, print_table, write_json
from kvcluster.common.config import EngineConfig
from kvcluster.common.sampling import SamplingParams
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.runner import ModelRunner

PREFIX_TOKENS = 512
TAILS = (17, 33, 50)
BLOCK_SIZE = 16


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_flags)
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    config = EngineConfig(block_size=BLOCK_SIZE, num_blocks=256, max_model_len=2048)
    runner = ModelRunner.from_pretrained("smollm2", dtype=args.dtype, engine_config=config)
    engine = LLMEngine(runner, stop_on_eos=False)
    prefix = [(i * 37) % 20000 + 100 for i in range(PREFIX_TOKENS)]
    engine.generate([prefix + [7]], SamplingParams(max_new_tokens=2))  # registers the prefix
    results = {"dtype": str(runner.model.dtype).removeprefix("torch."),
               "torch_threads": torch.get_num_threads(),
               "packed_prefill": runner.packed_prefill, "repeats": repeats,
               "prefix_tokens": PREFIX_TOKENS, "load_average_start": os.getloadavg()[0]}
    rows, same = [], []
    for tail in TAILS:
        samples = {"packed": [], "plain": []}
        for i in range(repeats):
            turn = prefix + [(j * 53 + i) % 20000 + 200 + tail for j in range(tail)]
            tokens = {}
            for mode in ("packed", "plain"):
                runner.packed_prefill = mode == "packed" and results["packed_prefill"]
                sample, tokens[mode] = _later_turn(engine, turn, f"{mode}-{tail}-{i}")
                samples[mode].append(sample)
                runner.blocks.reset_prefix_cache()  # the next one computes this tail too
                engine.generate([prefix + [7]], SamplingParams(max_new_tokens=1))
            same.append(tokens["packed"] == tokens["plain"])
        runner.packed_prefill = results["packed_prefill"]
        _record(rows, results, tail, samples)
    results["greedy_tokens_equal"] = sum(same) / len(same)
    results["load_average_end"] = os.getloadavg()[0]
    print_table(
        f"later-turn prefill step, {PREFIX_TOKENS} cached tokens, SmolLM2 {results['dtype']}, "
        f"torch threads {results['torch_threads']}",
        ["tail tokens", "packed ms p50", "plain ms p50", "plain / packed", "CPU ms packed",
         "CPU ms plain", "decode ms packed", "decode ms plain"], rows)
    print(f"greedy tokens equal: {results['greedy_tokens_equal']:.2f}; 1-min load average "
          f"{results['load_average_start']:.1f} at start, {results['load_average_end']:.1f} "
          f"at end on {os.cpu_count()} CPUs")
    write_json(args.json, results)
    return 0


def _extra_flags(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: what Ray gives an actor)")
    parser.add_argument("--dtype", default="auto", help="model dtype (default auto)")


def _later_turn(engine: LLMEngine, turn: list[int], request_id: str):
    """(prefill wall ms, prefill CPU ms, decode wall ms) and the turn's first 2 tokens."""
    engine.add_request(request_id, turn, SamplingParams(max_new_tokens=2))
    wall, cpu = time.perf_counter(), time.process_time()
    engine.step()  # the prefill step: the first token
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    decode = time.perf_counter()
    engine.step()  # one decode step
    decode = time.perf_counter() - decode
    seq = engine.pop(request_id)
    assert seq.num_cached_tokens == PREFIX_TOKENS, seq.num_cached_tokens
    return (wall * 1e3, cpu * 1e3, decode * 1e3), seq.output_ids


def _record(rows, results, tail, samples) -> None:
    med = {mode: [statistics.median(s[i] for s in samples[mode]) for i in range(3)]
           for mode in samples}
    ratio = med["plain"][0] / med["packed"][0]
    results[f"tail{tail}"] = {"packed_ms_p50": med["packed"][0], "plain_ms_p50": med["plain"][0],
                              "plain_over_packed": ratio,
                              "packed_cpu_ms_p50": med["packed"][1],
                              "plain_cpu_ms_p50": med["plain"][1],
                              "decode_ms_p50_packed": med["packed"][2],
                              "decode_ms_p50_plain": med["plain"][2]}
    rows.append([tail, med["packed"][0], med["plain"][0], ratio, med["packed"][1],
                 med["plain"][1], med["packed"][2], med["plain"][2]])


if __name__ == "__main__":
    raise SystemExit(main())
