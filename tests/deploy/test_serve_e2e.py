"""The deployment path end to end on one machine (slow: `pytest -m slow tests/deploy`).

What a Ray head does after `ray up`, with the pool nodes stood in for by one
local Ray node that advertises {"prefill_pool": 1, "decode_pool": 1}:

    cluster.example.yaml --render(--set ...)--> cluster.yaml
    wait_for_pools.py --config cluster.yaml      (returns once both pools have a node)
    kvcluster serve --config cluster.yaml --ray-address GCS
    kvcluster-healthcheck                        (SERVING)
    a Generate request twice through the client  (tokens; the second finds the prompt's KV)
    kvcluster status                             (both actors ok)

Real Redis (cluster mode: event streams, registry, Redis tier), real Ray, the
tiny random model. Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
KVCLUSTER = str(Path(sys.executable).parent / "kvcluster")

pytestmark = [pytest.mark.slow, pytest.mark.redis]

HOLDER = """
import os, signal, sys, time, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         resources={"prefill_pool": 1, "decode_pool": 1})
print(ray.get_runtime_context().gcs_address, flush=True)
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))
while True:
    time.sleep(1)
"""


def test_example_config_to_serving_cluster(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    redis_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        holder = subprocess.Popen([PY, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        gcs = holder.stdout.readline().strip()
        assert gcs, "the Ray holder did not start"

        model = tmp_path / "tiny"
        _run([KVCLUSTER, "model", "init-tiny", str(model)], env)
        config = tmp_path / "cluster.yaml"
        _run([PY, "-m", "kvcluster.deploy_config", "render", str(REPO / "deploy" / "cluster.example.yaml"),
              *_local_overrides(model, redis_port, grpc_port, metrics_port), "-o", str(config)], env)
        _run([PY, str(REPO / "deploy" / "tools" / "wait_for_pools.py"), "--config", str(config),
              "--address", gcs, "--timeout", "60", "--poll", "0.5"], env)

        log = (tmp_path / "serve.log").open("w")
        serve = subprocess.Popen([KVCLUSTER, "serve", "--config", str(config), "--ray-address", gcs],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(serve)
        _wait_healthy(serve, grpc_port, tmp_path / "serve.log", env)

        first, again = _generate_twice(grpc_port)
        assert first.final.num_output_tokens == len(first.token_ids) == 4
        assert (first.final.prefill_instance, first.final.decode_instance) == ("prefill-0", "decode-0")
        assert again.token_ids == first.token_ids  # greedy, same prompt
        assert again.final.num_cached_tokens > 0   # the prompt's KV found again in the cluster

        status = _run([KVCLUSTER, "status", "--ray-address", gcs], dict(env, COLUMNS="200"))
        assert "kvcluster-prefill-0" in status and "kvcluster-decode-0" in status
        assert "down" not in status
    finally:
        for proc in reversed(procs):
            _stop(proc)


# ---------------------------------------------------------------- helpers


def _local_overrides(model: Path, redis_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    """The example, shrunk to one machine: tiny model and tiers, loopback, one actor per pool."""
    sets = {
        "model.path": str(model), "model.model_id": "tiny", "model.device": "cpu", "model.dtype": "float32",
        "engine.block_size": 4, "engine.num_blocks": 256, "engine.max_model_len": 512,
        "workers.max_local_prefill_tokens": 0,  # the prompt goes through the prefill pool
        "store.chunk_tokens": 16, "store.device.capacity_bytes": 1 << 20,
        "store.host.capacity_bytes": 4 << 20, "store.disk.enabled": "false",
        "store.redis.url": f"redis://127.0.0.1:{redis_port}/1", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "transfer.host": "127.0.0.1", "transfer.port": 0,
        "router.host": "127.0.0.1", "router.port": grpc_port, "router.metrics_port": metrics_port,
        "workers.num_prefill": 1, "workers.num_decode": 1,
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def _generate_twice(port: int):
    from kvcluster.client import KVClusterClient
    from kvcluster.common.sampling import SamplingParams

    prompt = "the quick brown fox jumps over the lazy dog " * 4
    params = SamplingParams(max_new_tokens=4)
    with KVClusterClient(f"127.0.0.1:{port}") as client:
        return [client.generate(prompt, params=params, timeout_s=120) for _ in range(2)]


def _wait_healthy(serve: subprocess.Popen, port: int, log: Path, env: dict, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    check = [PY, str(REPO / "deploy" / "docker" / "healthcheck.py"), "--addr", f"127.0.0.1:{port}"]
    while time.monotonic() < deadline:
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{log.read_text()[-3000:]}"
        if subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"not SERVING after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{cmd[:3]}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
