"""Load: N concurrent streaming clients for T seconds against the local cluster.

    python -m bench.load [--quick] [--json FILE] [--clients N] [--seconds T] [--soak]
                         [--model tiny|smollm2]

Starts the whole system on loopback (local Ray, one prefill and one decode
actor, the front end in this process; a tiny random model by default), then
runs N threads, each with its own blocking client, sending streaming requests
back to back until T seconds are up. Prompts share a few documents (store
hits, KV transfers) and end in a per-request question (new chunks, so the
tiers fill and evict). Every request ends as exactly one of:

    ok     a final message arrived
    lost   an error status, or a stream that ended without a final message
    hung   no final message within the per-request deadline (DEADLINE_EXCEEDED,
           or a client thread still busy when the run's time bound is over)

Resident memory (VmRSS) of the front-end process (this process: front end,
routers and the client threads) and of each worker actor is read after a
warm-up phase and at the end; ``rss_growth_mb`` is the sum of the growth.
The baseline is the same cluster unloaded: ``ttft_p50_vs_idle`` = client-side
TTFT p50 under load / TTFT p50 of serial requests before the load.
``--quick``: 4 clients x 30 s; default 8 x 60 s; ``--soak``: 8 x 600 s.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

from bench.common import parse_args, print_table, write_json

DOCS = [f"Document {d}: " + ("The quick brown fox jumps over the lazy dog. " * 3) for d in range(4)]
WARMUP_FRACTION = 0.15


@dataclass
class Outcome:
    status: str
    """ok, lost or hung."""
    latency_s: float
    ttft_s: float | None = None
    num_tokens: int = 0
    error: str = ""


@dataclass
class LoadRun:
    """What the client threads collected."""

    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[int, float] = field(default_factory=dict)
    """Client number -> start time of the request it is waiting on."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, extra=_flags)
    clients, seconds = _size(args)
    with tempfile.TemporaryDirectory(prefix="kvcluster-load-") as tmp:
        cluster = start_cluster(cluster_config(args.model, tmp))
        try:
            report = run_load(cluster, clients, seconds, deadline_s=args.deadline)
        finally:
            cluster.close()
            _shutdown_ray()
    report.update(model=args.model, quick=args.quick, soak=args.soak)
    _print(report)
    write_json(args.json, report)
    return report


def cluster_config(model: str, workdir: str):
    """The load cluster: 1 prefill + 1 decode actor, limits far above the offered load."""
    from kvcluster.common.config import ClusterConfig, from_dict

    data = _tiny_sections(workdir) if model == "tiny" else _smollm2_sections()
    data.update(router={"port": 0, "http_port": 0, "metrics_port": 0},
                limits={"requests_per_s": 100_000.0, "burst": 100_000},
                workers={"num_prefill": 1, "num_decode": 1, "max_queue": 256})
    data["store"]["disk"] = {"enabled": False}
    return from_dict(ClusterConfig, data)


def start_cluster(config):
    from kvcluster.runtime.launcher import ClusterThread

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return ClusterThread(config, num_cpus=2, start_timeout_s=600)


def run_load(cluster, num_clients: int, seconds: float, deadline_s: float = 30.0,
             max_new_tokens: int = 16) -> dict:
    """Measure ``cluster`` (a started ClusterThread) under load; returns the report dict."""
    pids = worker_pids(cluster)
    idle = _idle_requests(cluster.address, deadline_s, max_new_tokens)
    warmup_s = seconds * WARMUP_FRACTION
    run = LoadRun()
    threads = _start_clients(cluster.address, num_clients, run, deadline_s, max_new_tokens,
                             stop_at=time.monotonic() + seconds)
    time.sleep(warmup_s)
    rss_before = {name: rss_mb(pid) for name, pid in pids.items()}
    began, num_warmup = time.monotonic(), len(run.outcomes)
    give_up_at = began + seconds + deadline_s + 10
    samples = _sample_rss(pids, threads, max(1.0, seconds / 20), give_up_at)
    hung_threads = _join(threads, give_up_at - time.monotonic())
    measured_s = time.monotonic() - began
    rss_after = {name: rss_mb(pid) for name, pid in pids.items()}
    report = summarize(run.outcomes, num_warmup, measured_s, hung_threads)
    report.update(clients=num_clients, seconds=seconds, deadline_s=deadline_s,
                  rss_before_mb=rss_before, rss_after_mb=rss_after, rss_samples_mb=samples,
                  rss_growth_mb=round(sum(rss_after[n] - rss_before[n] for n in pids), 1),
                  metrics_ttft_count=_ttft_count(cluster))
    _add_idle(report, idle)
    return report


def summarize(outcomes: list[Outcome], num_warmup: int, measured_s: float,
              hung_threads: int) -> dict:
    """Counts over every request; rates and percentiles over the post-warm-up ones."""
    main = outcomes[num_warmup:]
    ok = [o for o in main if o.status == "ok"]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    latencies = [o.latency_s for o in ok]
    errors = sorted({o.error for o in outcomes if o.error})
    return {
        "requests": len(outcomes) + hung_threads,
        "ok": sum(o.status == "ok" for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "hung": sum(o.status == "hung" for o in outcomes) + hung_threads,
        "errors": errors[:10],
        "requests_per_s": round(len(ok) / measured_s, 2) if measured_s else 0.0,
        "output_tokens_per_s": round(sum(o.num_tokens for o in ok) / measured_s, 1)
        if measured_s else 0.0,
        **{f"ttft_p{p}_ms": round(_percentile(ttfts, p) * 1e3, 2) for p in (50, 90, 99)},
        **{f"latency_p{p}_ms": round(_percentile(latencies, p) * 1e3, 2) for p in (50, 90, 99)},
    }


def worker_pids(cluster) -> dict[str, int]:
    """Process ids by name: "frontend" (this process) and each worker actor."""
    import ray

    pids = {"frontend": os.getpid()}
    for handle in cluster.cluster.pools.prefill + cluster.cluster.pools.decode:
        pids[handle.instance_id] = ray.get(handle.actor.info.remote(), timeout=30)["pid"]
    return pids


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# ---------------------------------------------------------------- clients


def _start_clients(address: str, num_clients: int, run: LoadRun, deadline_s: float,
                   max_new_tokens: int, stop_at: float) -> list[threading.Thread]:
    threads = [threading.Thread(target=_client, name=f"load-client-{n}", daemon=True,
                                args=(address, n, run, deadline_s, max_new_tokens, stop_at))
               for n in range(num_clients)]
    for thread in threads:
        thread.start()
    return threads


def _client(address: str, number: int, run: LoadRun, deadline_s: float,
            max_new_tokens: int, stop_at: float) -> None:
    from kvcluster.client import KVClusterClient

    with KVClusterClient(address) as client:
        turn = 0
        while time.monotonic() < stop_at:
            run.in_flight[number] = time.monotonic()
            run.add(_one_request(address, number, turn, deadline_s, max_new_tokens, client))
            run.in_flight.pop(number, None)
            turn += 1


def _one_request(address: str, number: int, turn: int, deadline_s: float,
                 max_new_tokens: int, client=None) -> Outcome:
    from kvcluster.client import FinalEvent, GenerateError, KVClusterClient, TokenEvent
    from kvcluster.common.sampling import SamplingParams

    own = client is None
    client = client or KVClusterClient(address)
    prompt = DOCS[(number + turn) % len(DOCS)] + f"Client {number}, question {turn}?"
    params = SamplingParams(max_new_tokens=4 + (turn % 3) * (max_new_tokens // 3))
    began, ttft, num_tokens, final = time.perf_counter(), None, 0, None
    try:
        for event in client.generate_stream(prompt, params=params, timeout_s=deadline_s,
                                            tenant=f"tenant-{number % 2}"):
            if isinstance(event, TokenEvent) and event.token_ids:
                ttft = ttft if ttft is not None else time.perf_counter() - began
                num_tokens += len(event.token_ids)
            elif isinstance(event, FinalEvent):
                final = event
    except GenerateError as exc:
        status = "hung" if exc.code.name == "DEADLINE_EXCEEDED" else "lost"
        return Outcome(status, time.perf_counter() - began, ttft, num_tokens, str(exc)[:200])
    finally:
        if own:
            client.close()
    if final is None:
        return Outcome("lost", time.perf_counter() - began, ttft, num_tokens, "no final message")
    return Outcome("ok", time.perf_counter() - began, ttft, num_tokens)


def _idle_requests(address: str, deadline_s: float, max_new_tokens: int) -> list[Outcome]:
    """The baseline: serial requests on one warm connection; the first 3 warm up."""
    from kvcluster.client import KVClusterClient

    with KVClusterClient(address) as client:
        outcomes = [_one_request(address, 0, turn, deadline_s, max_new_tokens, client)
                    for turn in range(8)]
    return outcomes


def _add_idle(report: dict, idle: list[Outcome]) -> None:
    """Count the baseline's requests; its last 5 give the unloaded TTFT."""
    idle_ttft = _percentile([o.ttft_s for o in idle[3:] if o.ttft_s is not None], 50)
    report["idle_ttft_p50_ms"] = round(idle_ttft * 1e3, 2)
    report["ttft_p50_vs_idle"] = (round(report["ttft_p50_ms"] / 1e3 / idle_ttft, 2)
                                  if idle_ttft else None)
    for status in ("ok", "lost", "hung"):
        report[status] += sum(o.status == status for o in idle)
    report["requests"] += len(idle)


def _join(threads: list[threading.Thread], timeout_s: float) -> int:
    """Wait for the clients; returns how many are still stuck in a request."""
    end = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return sum(thread.is_alive() for thread in threads)


def _sample_rss(pids: dict[str, int], threads: list[threading.Thread],
                interval_s: float, until: float) -> list[dict]:
    """RSS of every process every ``interval_s`` while the clients run (soak trend)."""
    samples, began = [], time.monotonic()
    while any(t.is_alive() for t in threads) and time.monotonic() < until:
        samples.append({"t_s": round(time.monotonic() - began, 1),
                        **{name: rss_mb(pid) for name, pid in pids.items()}})
        for thread in threads:
            thread.join(interval_s / len(threads))
    return samples


# ---------------------------------------------------------------- helpers


def _flags(parser) -> None:
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=None, help="load duration")
    parser.add_argument("--soak", action="store_true", help="10 minutes")
    parser.add_argument("--deadline", type=float, default=30.0,
                        help="per-request deadline (s): later answers count as hung")
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])


def _size(args) -> tuple[int, float]:
    clients, seconds = (4, 30.0) if args.quick else (8, 600.0) if args.soak else (8, 60.0)
    return args.clients or clients, args.seconds or seconds


def _tiny_sections(workdir: str) -> dict:
    from kvcluster.engine.tiny import write_tiny_model

    path = write_tiny_model(os.path.join(workdir, "tiny-llama"))
    return {"model": {"path": str(path), "model_id": "tiny-llama", "device": "cpu"},
            "engine": {"block_size": 4, "num_blocks": 512, "max_model_len": 512},
            "store": {"chunk_tokens": 16, "device": {"capacity_bytes": 1 << 20},
                      "host": {"capacity_bytes": 4 << 20}},
            "transfer": {"chunk_tokens": 32, "policy": "lossless", "timeout_s": 20.0,
                         "chunk_timeout_s": 2.0}}


def _smollm2_sections() -> dict:
    return {"model": {"path": "smollm2"},
            "engine": {"block_size": 16, "num_blocks": 768, "max_model_len": 2048},
            "store": {"chunk_tokens": 64, "device": {"capacity_bytes": 64 << 20},
                      "host": {"capacity_bytes": 128 << 20}},
            "transfer": {"chunk_tokens": 128, "policy": "adaptive", "timeout_s": 30.0}}


def _ttft_count(cluster) -> float:
    metrics = cluster.cluster.frontend_metrics
    return metrics.registry.get_sample_value("kvcluster_frontend_ttft_seconds_count") or 0.0


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _print(report: dict) -> None:
    keys = ["requests", "ok", "lost", "hung", "requests_per_s", "output_tokens_per_s",
            "ttft_p50_ms", "ttft_p99_ms", "idle_ttft_p50_ms", "ttft_p50_vs_idle",
            "latency_p50_ms", "latency_p99_ms", "rss_growth_mb", "metrics_ttft_count"]
    print_table(f"bench.load: {report['clients']} clients x {report['seconds']:.0f} s "
                f"({report['model']} model)", ["metric", "value"],
                [(k, report[k]) for k in keys])
    print_table("resident memory (MiB)", ["process", "after warm-up", "end", "growth"],
                [(n, b, report["rss_after_mb"][n], round(report["rss_after_mb"][n] - b, 1))
                 for n, b in report["rss_before_mb"].items()])
    if report["errors"]:
        print("errors:", *report["errors"], sep="\n  ")


if __name__ == "__main__":
    main()
