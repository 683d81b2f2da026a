"""`make demo`: the whole cluster on one machine, serving a multi-turn chat workload.

Local Ray with one prefill actor and one decode actor, the KV-aware routers
and the front ends; two users hold multi-turn conversations with a support
assistant whose long system prompt they share, through the OpenAI-compatible
HTTP API and the official ``openai`` SDK (streamed, so time to first token is
measured by the client). Each turn's prompt is the previous turn's prompt plus
the answer and a new question, so its prefix is already cached somewhere in
the cluster; ``usage.prompt_tokens_details.cached_tokens`` says how much.

Prints TTFT p50/p99, tokens/s, prefix hits per tier and bytes on the wire
against raw fp16, and writes a PNG plot of TTFT per turn.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcluster.common.config import ClusterConfig, from_dict
from kvcluster.demo_text import QUESTIONS, SYSTEM_PROMPT

MAX_NEW_TOKENS = 32
NUM_USERS = 2
PLOT_PATH = Path("out/demo_ttft.png")


@dataclass
class Turn:
    user: int
    turn: int
    ttft_ms: float
    """Request sent -> first text chunk received, measured by the client."""
    server_ttft_ms: float
    """The backend's own figure (the ``kvcluster`` extension of the response)."""
    total_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    cached_tokens_by_tier: dict[str, int]
    num_output_tokens: int
    text: str


VLLM_BLOCK_TOKENS = 32
"""vLLM-CPU pages in multiples of 32 tokens."""


def demo_config(model: str, disk_dir: str, engine: str = "native") -> ClusterConfig:
    """Small tiers on purpose, so chunks spill down and hits show up per tier. With
    ``engine`` "vllm", the same KV cache in tokens in vLLM-CPU's 32-token blocks."""
    block_size = VLLM_BLOCK_TOKENS if engine == "vllm" else 16
    # vLLM: one store chunk per vLLM block, so that every block vLLM's cache holds can
    # go to (and come back from) the tiers; a chunk of several blocks loses the partial
    # one at the end of each turn's prompt and answer.
    chunk_tokens = VLLM_BLOCK_TOKENS if engine == "vllm" else 128
    return from_dict(ClusterConfig, {
        "model": {"path": model},
        "engine": {"kind": engine, "block_size": block_size,
                   "num_blocks": 512 * 16 // block_size, "max_model_len": 2048},
        "store": {"chunk_tokens": chunk_tokens,
                  "device": {"capacity_bytes": 12 << 20},
                  "host": {"capacity_bytes": 24 << 20},
                  # the staging of 16 chunks of 128 tokens, whatever the chunk: a burst
                  # of spills past it skips the disk (the chunks are lost)
                  "disk": {"enabled": True, "directory": disk_dir, "capacity_bytes": 1 << 30,
                           "max_pending_writes": 16 * 128 // chunk_tokens}},
        "transfer": {"chunk_tokens": 256, "slo_ms": 2000},
        "router": {"port": 0, "http_port": 0},
    })


def run_demo(model: str = "smollm2", engine: str = "native") -> int:
    from rich.console import Console

    from kvcluster.runtime.launcher import ClusterThread

    console = Console()
    with tempfile.TemporaryDirectory(prefix="kvcluster-demo-") as disk_dir:
        with console.status("starting local Ray, 1 prefill + 1 decode actor, front end ..."):
            began = time.perf_counter()
            cluster = ClusterThread(demo_config(model, disk_dir, engine), num_cpus=2)
        console.print(f"cluster up in {time.perf_counter() - began:.1f} s; OpenAI-compatible "
                      f"API on [bold]http://{cluster.http_address}/v1[/], gRPC on "
                      f"{cluster.address}")
        try:
            turns, wall_s = _run_workload(cluster.http_address, model, console)
            results = list(cluster.cluster.backend.stats["prefill_results"])
        finally:
            cluster.close()
    console.print(_answers_table(turns))
    console.print(_summary_table(turns, results, wall_s, _serving(cluster.cluster.config)))
    _plot(turns, PLOT_PATH)
    console.print(f"TTFT plot written to [bold]{PLOT_PATH}[/]")
    return 0


def _run_workload(http_address: str, model: str, console) -> tuple[list[Turn], float]:
    import openai
    from rich.progress import Progress

    histories = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in range(NUM_USERS)]
    turns: list[Turn] = []
    began = time.perf_counter()
    client = openai.OpenAI(base_url=f"http://{http_address}/v1", api_key="unused",
                           max_retries=0, timeout=300)
    with client, Progress(console=console) as progress:
        task = progress.add_task("chat turns", total=NUM_USERS * len(QUESTIONS))
        for turn, question in enumerate(QUESTIONS):
            for user in range(NUM_USERS):
                history = histories[user]
                history.append({"role": "user", "content": _personalise(question, user)})
                turns.append(_ask(client, model, history, user, turn))
                history.append({"role": "assistant", "content": turns[-1].text})
                progress.advance(task)
    return turns, time.perf_counter() - began


def _personalise(question: str, user: int) -> str:
    return question if user == 0 else f"Hi, this is customer {user + 1000}. {question}"


def _ask(client, model: str, messages, user: int, turn: int) -> Turn:
    """One streamed, greedy chat turn; TTFT is the first text chunk's arrival."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=list(messages), max_tokens=MAX_NEW_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    first_s = server_ttft_ms = 0.0
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first_s = first_s or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            server_ttft_ms = (getattr(chunk, "kvcluster", None) or {}).get("ttft_ms", 0.0)
        usage = chunk.usage or usage
    details = usage.prompt_tokens_details
    first_s = first_s or time.perf_counter() - start  # no text at all: the whole answer
    return Turn(user, turn, first_s * 1e3, server_ttft_ms, time.perf_counter() - start,
                usage.prompt_tokens, details.cached_tokens,
                dict(getattr(details, "cached_tokens_by_tier", None) or {}),
                usage.completion_tokens, "".join(pieces).strip())


def _answers_table(turns: list[Turn]):
    from rich.table import Table

    table = Table(title="multi-turn chats over a shared 430-token system prompt")
    for name in ("user", "turn", "prompt tok", "cached tok", "TTFT ms", "answer"):
        table.add_column(name, justify="left" if name == "answer" else "right")
    for t in turns:
        table.add_row(str(t.user), str(t.turn + 1), str(t.num_prompt_tokens),
                      str(t.num_cached_tokens), f"{t.ttft_ms:.0f}", t.text[:70])
    return table


def _serving(config: ClusterConfig) -> str:
    """Which engine served the demo, in which dtype on which device."""
    from kvcluster.engine.placement import resolve_device, resolve_dtype

    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    engine = {"native": "native (kvcluster's torch engine)",
              "vllm": "vLLM (kvcluster's KV connector)"}.get(config.engine.kind,
                                                              config.engine.kind)
    return f"{engine}, {dtype} on {device}"


def _summary_table(turns: list[Turn], results, wall_s: float, serving: str):
    from rich.table import Table

    ttfts = sorted(t.ttft_ms for t in turns)
    prompt_tokens = sum(r.num_prompt_tokens for r in results) or 1
    by_tier: dict[str, int] = {}
    for r in results:
        for tier, n in r.cached_tokens_by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    wire = sum(r.wire_bytes for r in results)
    raw = sum(r.raw_bytes for r in results) or 1
    table = Table(title="cluster summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("engine", serving)
    table.add_row("requests", str(len(turns)))
    server = sorted(t.server_ttft_ms for t in turns)
    table.add_row("TTFT p50 / p99 (ms, client)", f"{_pct(ttfts, 50):.0f} / {_pct(ttfts, 99):.0f}")
    table.add_row("TTFT p50 / p99 (ms, backend)",
                  f"{_pct(server, 50):.0f} / {_pct(server, 99):.0f}")
    table.add_row("output tokens/s", f"{sum(t.num_output_tokens for t in turns) / wall_s:.1f}")
    table.add_row("cached prompt tokens (usage.cached_tokens)",
                  f"{sum(t.num_cached_tokens for t in turns)} / "
                  f"{sum(t.num_prompt_tokens for t in turns)}")
    sources: dict[str, int] = {}
    for t in turns:
        for source, n in t.cached_tokens_by_tier.items():
            sources[source] = sources.get(source, 0) + n
    table.add_row("cached tokens by source (usage extension)",
                  ", ".join(f"{k}: {v}" for k, v in sorted(sources.items())) or "-")
    for tier in ("device", "host", "disk", "redis"):
        table.add_row(f"prefill kvstore hits: {tier}",
                      f"{100 * by_tier.get(tier, 0) / prompt_tokens:.1f}% of prompt tokens")
    table.add_row("KV bytes on the wire / raw fp16",
                  f"{wire / 2**20:.1f} MiB / {raw / 2**20:.1f} MiB ({wire / raw:.2f}x)")
    planes: dict[str, int] = {}
    for r in results:
        if r.data_plane:
            planes[r.data_plane] = planes.get(r.data_plane, 0) + 1
    table.add_row("requests the prefill worker prefilled (workers.max_local_prefill_tokens)",
                  f"{len(results)} of {len(turns)}")
    table.add_row("KV data plane (transfers)",
                  ", ".join(f"{k}: {v}" for k, v in sorted(planes.items())) or "-")
    levels = sorted({lv for r in results for lv in r.levels})
    table.add_row("codec levels chosen", ", ".join(levels) or "-")
    return table


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _plot(turns: list[Turn], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for user in sorted({t.user for t in turns}):
        mine = [t for t in turns if t.user == user]
        ax.plot([t.turn + 1 for t in mine], [t.ttft_ms for t in mine], marker="o",
                label=f"user {user}")
    ax.set_xticks(sorted({t.turn + 1 for t in turns}))
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("kvcluster demo: time to first token per turn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
