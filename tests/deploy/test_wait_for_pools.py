"""deploy/tools/wait_for_pools.py: serve starts only once every pool's nodes have joined.

Against a real local Ray whose node advertises pool resources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcluster.common.config import ClusterConfig, WorkersConfig
from kvcluster.deploy_config import write_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "tools" / "wait_for_pools.py"
sys.path.insert(0, str(SCRIPT.parent))
from wait_for_pools import missing_pools, wait_for_pools  # noqa: E402


def _config(num_prefill: int, num_decode: int, colocated: bool = False) -> ClusterConfig:
    return ClusterConfig(workers=WorkersConfig(num_prefill=num_prefill, num_decode=num_decode,
                                               colocated=colocated))


def test_missing_pools_counts_each_pool():
    resources = {"CPU": 8.0, "prefill_pool": 1.0}
    assert missing_pools(_config(2, 1), resources) == {"prefill_pool": (1.0, 2), "decode_pool": (0.0, 1)}
    assert missing_pools(_config(1, 1), {"prefill_pool": 1.0, "decode_pool": 3.0}) == {}
    # colocated: one pool of combined workers, placed with the decode resource
    assert missing_pools(_config(9, 1, colocated=True), {"decode_pool": 1.0}) == {}


@pytest.fixture(scope="module")
def ray_with_pools():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # never take over a Ray that another test module set up
        pytest.skip("Ray is already initialised in this process by another test")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, resources={"prefill_pool": 2, "decode_pool": 1},
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_returns_once_the_pools_are_there(ray_with_pools):
    messages = []
    assert wait_for_pools(_config(2, 1), timeout_s=10, poll_s=0.1, log=messages.append)
    assert messages == []


def test_times_out_naming_the_short_pool(ray_with_pools):
    messages = []
    assert not wait_for_pools(_config(2, 3), timeout_s=0.3, poll_s=0.1, log=messages.append)
    assert messages[-1] == "timed out; still short: decode_pool 1/3"


def test_cli_exit_codes_against_the_running_cluster(ray_with_pools, tmp_path):
    ready, short = tmp_path / "ready.yaml", tmp_path / "short.yaml"
    write_config(_config(1, 1), ready)
    write_config(_config(3, 1), short)
    cmd = [sys.executable, str(SCRIPT), "--address", ray_with_pools, "--poll", "0.2"]
    ok = subprocess.run(cmd + ["--config", str(ready), "--timeout", "30"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    late = subprocess.run(cmd + ["--config", str(short), "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert late.returncode == 1
    assert "still short: prefill_pool 2/3" in late.stdout
