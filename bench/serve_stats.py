"""bench.serve's figures from a workload's request results.

``overhead_ms``: kvcluster's own path on a request, i.e. the client's TTFT minus
the engine's forward passes before the first token. The forward passes are
``stage_ms["first_decode_step"]`` (the decode engine's step that computes the
uncached tail and samples the first token) and, when a prefill worker ran,
``stage_ms["prefill"]`` (its forward passes). Everything else (HTTP, admission,
routing, Ray hops, KV transfer, prefix loads, queueing, token relay, SSE) counts
as overhead. It is computed on later turns (turn >= 2) whose prompt is at least
:data:`CACHED_ENOUGH` cached, where little compute remains and the path dominates.
"""

from __future__ import annotations

import numpy as np

from bench.serve_client import RequestResult
from bench.serve_runner import WorkloadRun

CACHED_ENOUGH = 0.9
ENGINE_STAGES = ("first_decode_step", "prefill")


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile; None for no values."""
    return float(np.percentile(values, p)) if values else None


def summarize(run: WorkloadRun) -> dict:
    """The per-(system, workload) figures: TTFT p50/p99, ITL p50, tokens/s, cached share."""
    ok = [r for r in run.results if r.ok]
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    gaps = [g for r in ok for g in r.gaps_ms]
    later = [r.ttft_ms for r in ok if r.turn > 0 and r.ttft_ms is not None]
    prompt = sum(r.num_prompt_tokens for r in ok)
    output = sum(r.num_output_tokens for r in ok)
    overheads = overhead_ms(ok)
    return {
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "first_error": next((r.error for r in run.results if not r.ok), ""),
        "wall_s": round(run.wall_s, 2),
        "ttft_p50_ms": _round(percentile(ttfts, 50)),
        "ttft_p99_ms": _round(percentile(ttfts, 99)),
        "later_turn_ttft_p50_ms": _round(percentile(later, 50)),
        "itl_p50_ms": _round(percentile(gaps, 50)),
        "output_tokens": output,
        "output_tokens_per_s": round(output / run.wall_s, 2) if run.wall_s else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.num_cached_tokens for r in ok),
        "cached_share": round(sum(r.num_cached_tokens for r in ok) / prompt, 4) if prompt else 0.0,
        "stage_ms_p50": stage_p50(ok),
        "overhead_requests": len(overheads),
        "overhead_ms_p50": _round(percentile(overheads, 50)),
        "same_instance_share": same_instance_share(run.results),
        "instances": sorted({r.instance for r in ok if r.instance}),
    }


REQUEST_COLUMNS = ("conversation", "turn", "ttft_ms", "prompt_tokens", "cached_tokens",
                   "instance")


def request_rows(run: WorkloadRun) -> list[list]:
    """One row per successful request (REQUEST_COLUMNS), in the order they were sent:
    what a reader needs to compare like with like, e.g. first turns (equal work on
    every system) apart from later ones."""
    return [[r.conversation, r.turn, _round(r.ttft_ms), r.num_prompt_tokens,
             r.num_cached_tokens, r.instance]
            for r in sorted(run.results, key=lambda r: r.sent_s) if r.ok]


def same_instance_share(results: list[RequestResult]) -> float | None:
    """Of the later turns whose instance and previous turn's instance are known, the
    share served by the instance that served the conversation's previous turn (the
    one holding its history); None when no server says which instance it was."""
    served = {(r.conversation, r.turn): r.instance for r in results if r.ok and r.instance}
    pairs = [(instance, served[(c, t - 1)]) for (c, t), instance in served.items()
             if (c, t - 1) in served]
    return round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None


def overhead_ms(results: list[RequestResult]) -> list[float]:
    """kvcluster's own path (see the module docstring) on each qualifying request."""
    return [r.ttft_ms - sum(r.stage_ms.get(s, 0.0) for s in ENGINE_STAGES)
            for r in results
            if r.ok and r.turn > 0 and r.stage_ms and r.ttft_ms is not None
            and r.cached_fraction >= CACHED_ENOUGH]


def stage_p50(results: list[RequestResult]) -> dict[str, float]:
    """p50 of each stage_ms key over the requests that report it ({} for other servers)."""
    keys = sorted({k for r in results for k in r.stage_ms})
    return {k: round(percentile([r.stage_ms[k] for r in results if k in r.stage_ms], 50), 2)
            for k in keys}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
