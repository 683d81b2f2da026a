"""``kvcluster status``: ask each worker actor of a running cluster how it is."""

from __future__ import annotations

import os


def print_status(ray_address: str = "auto") -> int:
    import ray
    from rich.console import Console
    from rich.table import Table

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=ray_address, namespace="kvcluster", log_to_driver=False,
             configure_logging=False)
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == "kvcluster"
                   if a["name"].startswith("kvcluster-"))
    table = Table(title="kvcluster instances")
    for column in ("instance", "health", "queued prefill tok", "active decodes", "tiers",
                   "hit rate", "data plane", "metrics"):
        table.add_column(column)
    for name in names:
        table.add_row(*_row(name))
    console = Console()
    console.print(_frontend_line())
    console.print(table if names else "no kvcluster actors in this Ray cluster")
    return 0 if names else 1


def hit_rates(stats: dict) -> dict[str, float]:
    """Per tier: prompt chunks served from it / prompt chunks looked up (an actor's
    ``stats()``; hits in any tier + misses when it does not count lookups)."""
    hits = {tier: float(v["hits"]) for tier, v in stats["tiers"].items()}
    asked = float(stats.get("lookup_chunks") or sum(hits.values()) + stats.get("misses", 0.0))
    return {tier: (h / asked if asked else 0.0) for tier, h in hits.items()}


def data_plane_cell(stats: dict) -> str:
    """``transfer.data_plane`` and transfers per plane: a decode worker's grants, a
    prefill worker's sends (e.g. "auto: shm 12, tcp 3")."""
    info = stats.get("data_plane") or {}
    if not info:
        return "-"
    counts = info.get("grants", info.get("transfers", {}))
    used = ", ".join(f"{plane} {n}" for plane, n in sorted(counts.items()))
    return f"{info.get('data_plane', '?')}: {used or 'no transfers yet'}"


def _frontend_line() -> str:
    """Where the front end (which is no actor) serves, as the launcher announced it."""
    import json

    from ray.experimental import internal_kv

    from kvcluster.runtime.launcher import FRONTEND_KEY

    try:
        raw = internal_kv._internal_kv_get(FRONTEND_KEY, namespace="kvcluster")
    except Exception:  # noqa: BLE001 - an older cluster, or no KV access
        raw = None
    if not raw:
        return "front end: not announced"
    info = json.loads(raw)
    return (f"front end: {info['address']}  metrics: "
            f"http://{info['metrics_address']}/metrics")


def _row(name: str) -> list[str]:
    import ray

    try:
        actor = ray.get_actor(name)
        load, _, _ = ray.get(actor.poll.remote(False), timeout=5)
        stats = ray.get(actor.stats.remote(), timeout=5)
    except Exception as exc:  # dead, restarting or unreachable
        return [name, f"[red]down[/red] ({type(exc).__name__})", "-", "-", "-", "-", "-", "-"]
    tiers = ", ".join(f"{t}: {v['used_bytes'] / 2**20:.1f}/{v['capacity_bytes'] / 2**20:.0f} MiB "
                      f"{int(v['hits'])} hits" for t, v in stats["tiers"].items())
    rates = ", ".join(f"{t}: {r:.0%}" for t, r in hit_rates(stats).items())
    endpoint = stats.get("metrics_address", "")
    return [name, "[green]ok[/green]", str(load.queued_prefill_tokens),
            str(load.active_decode_requests), tiers, rates, data_plane_cell(stats),
            f"http://{endpoint}/metrics" if endpoint else "-"]
