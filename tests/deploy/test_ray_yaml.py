"""deploy/ray/*.yaml against the cluster-config schema the installed `ray` ships.

Each file goes through the cluster launcher's own path (`prepare_config`, which
fills provider defaults, then `validate_config`, which checks ray-schema.json
and the node-type rules), and the shell commands that build the cluster file
and pick a worker's pool are run for real.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ray_util = pytest.importorskip("ray.autoscaler._private.util")

from kvcluster.common.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY_DIR = REPO / "deploy" / "ray"
FILES = ["cluster.yaml", "local.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((RAY_DIR / name).read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _launcher_validate(config: dict) -> dict:
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", FILES)
def test_file_passes_rays_schema_as_written_and_as_prepared(name):
    config = _load(name)
    jsonschema.validate(config, _ray_schema())
    prepared = _launcher_validate(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _typo_key(c):
    c["setup_comands"] = ["echo typo"]


def _string_resource(c):
    c["available_node_types"]["prefill_gpu"]["resources"]["prefill_pool"] = "one"


def _missing_head_type(c):
    c["head_node_type"] = "no_such_type"


def _negative_resource(c):
    c["available_node_types"]["decode_gpu"]["resources"]["decode_pool"] = -1


@pytest.mark.parametrize("breakage", [_typo_key, _string_resource, _missing_head_type,
                                      _negative_resource])
def test_broken_cluster_yaml_is_rejected(breakage):
    config = _load("cluster.yaml")
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _launcher_validate(config)


def test_broken_local_yaml_is_rejected():
    config = _load("local.yaml")
    config["worker_start_ray_commands"] = "ray start"  # must be a list of commands
    with pytest.raises(jsonschema.ValidationError):
        _launcher_validate(config)


@pytest.mark.parametrize("name", FILES)
def test_every_command_parses_as_bash(name):
    """The launcher runs each command with bash over ssh: `bash -n` checks the syntax only."""
    config = _load(name)
    keys = [k for k in config if k.endswith("_commands")]
    commands = [c for k in keys for c in config[k]]
    assert len(commands) >= 10
    for command in commands:
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (command, done.stderr)


def test_one_ami_for_every_node_type_and_not_rays_outdated_default():
    types = _load("cluster.yaml")["available_node_types"]
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(amis) == 1 and "latest_dlami" not in amis  # Ubuntu 18.04 / CUDA 11.2: too old
    assert "&kvcluster_ami" in (RAY_DIR / "cluster.yaml").read_text()  # set in one place


def test_each_pool_has_its_own_gpu_node_type():
    types = _load("cluster.yaml")["available_node_types"]
    pools = {name: {k for k in t["resources"] if k.endswith("_pool")} for name, t in types.items()}
    assert pools == {"head": set(), "prefill_gpu": {"prefill_pool"}, "decode_gpu": {"decode_pool"}}
    for name in ("prefill_gpu", "decode_gpu"):
        assert types[name]["resources"]["GPU"] >= 1
    example = load_config(REPO / "deploy" / "cluster.example.yaml")
    assert example.workers.num_prefill <= types["prefill_gpu"]["max_workers"]
    assert example.workers.num_decode <= types["decode_gpu"]["max_workers"]


@pytest.mark.parametrize("name", FILES)
def test_head_commands_start_serve_with_the_rendered_file(name):
    commands = _load(name)["head_start_ray_commands"]
    serve = [c for c in commands if "kvcluster serve" in c]
    assert len(serve) == 1 and "--config ~/kvcluster/cluster.yaml" in serve[0]
    waits = serve[0].index("deploy/tools/wait_for_pools.py --config ~/kvcluster/cluster.yaml &&")
    assert waits < serve[0].index("kvcluster serve")  # serve only once the pool nodes have joined
    assert (REPO / "deploy" / "tools" / "wait_for_pools.py").exists()
    assert commands.index(serve[0]) > commands.index(_render_command(name))
    assert any("ray start --head" in c for c in commands)


@pytest.mark.parametrize("name", FILES)
def test_head_render_command_writes_a_loadable_cluster_file(name, tmp_path):
    """Run the head's render command as written, in a fake home holding the upload."""
    home = _fake_home(tmp_path, token="ab" * 32)
    env = dict(os.environ, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", _render_command(name)], env=env, cwd=home,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = load_config(home / "kvcluster" / "cluster.yaml")
    head_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    assert config.redis_url == f"redis://:{'ab' * 32}@{head_ip}:6380/0"
    assert config.store.redis.url == f"redis://:{'ab' * 32}@{head_ip}:6380/1"
    assert config.workers.num_prefill == 2


def test_local_worker_ips_and_pools_agree():
    config = _load("local.yaml")
    prefill, decode = _pool_ips(config)
    assert not prefill & decode
    assert prefill | decode == set(config["provider"]["worker_ips"])
    assert config["provider"]["head_ip"] not in prefill | decode


@pytest.mark.parametrize("addresses, expected", [
    ("192.0.2.12 fd00::7", {"prefill_pool": 1}),
    ("10.9.9.9 192.0.2.21", {"decode_pool": 1}),
])
def test_local_worker_start_picks_its_pool(addresses, expected, tmp_path):
    done = _run_worker_start(tmp_path, addresses)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "ray-argv").read_text().split("\n")
    resources = [a.split("=", 1)[1] for a in argv if a.startswith("--resources=")]
    assert json.loads(resources[0]) == expected
    assert "--address=192.0.2.10:6379" in argv


def test_local_worker_outside_every_pool_refuses_to_start(tmp_path):
    done = _run_worker_start(tmp_path, "198.51.100.7")
    assert done.returncode == 1
    assert "is in no pool" in done.stderr or "PREFILL_IPS" in done.stderr
    assert not (tmp_path / "ray-argv").exists()


# ---------------------------------------------------------------- helpers


def _render_command(name: str) -> str:
    (cmd,) = [c for c in _load(name)["head_start_ray_commands"] if "deploy_config render" in c]
    return cmd


def _fake_home(tmp_path: Path, token: str) -> Path:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    (home / "kvcluster").mkdir()
    (home / "kvcluster" / "src").symlink_to(REPO)  # what file_mounts uploads
    return home


def _pool_ips(config: dict) -> tuple[set[str], set[str]]:
    (cmd,) = [c for c in config["worker_start_ray_commands"] if "--resources" in c]
    prefill = re.search(r'PREFILL_IPS="([^"]*)"', cmd).group(1).split()
    decode = re.search(r'DECODE_IPS="([^"]*)"', cmd).group(1).split()
    return set(prefill), set(decode)


def _run_worker_start(tmp_path: Path, addresses: str) -> subprocess.CompletedProcess:
    """Run local.yaml's worker start command with `hostname -I` answering ``addresses``.

    `ray` is a stand-in that records its argv: starting a real Ray node that joins
    a head at a documentation address is not possible here.
    """
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(stubs / "hostname", f'echo "{addresses}"')
    _stub(stubs / "ray", f'printf "%s\\n" "$@" > {tmp_path}/ray-argv')
    (cmd,) = [c for c in _load("local.yaml")["worker_start_ray_commands"] if "--resources" in c]
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", RAY_HEAD_IP="192.0.2.10")
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
