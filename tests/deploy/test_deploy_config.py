"""kvcluster.deploy_config: base + fragments + overrides -> one validated cluster file."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvcluster.common.config import ConfigError, load_config
from kvcluster.deploy_config import deep_merge, parse_assignment, render_config, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "cluster.example.yaml"


def test_example_config_loads_with_the_cluster_values():
    config = load_config(EXAMPLE)
    assert config.router.host == "0.0.0.0" and config.router.port == 50051
    assert config.router.metrics_port == 9090
    assert config.transfer.host == "0.0.0.0"
    assert config.store.disk.enabled and config.store.redis.enabled
    assert (config.workers.num_prefill, config.workers.num_decode) == (2, 2)
    assert config.security.tokens == {}


def test_render_merges_fragment_then_sets(tmp_path):
    fragment = tmp_path / "security.yaml"
    fragment.write_text("security:\n  tokens: {tok-a: tenant-a}\nworkers: {num_decode: 5}\n")
    config = render_config(EXAMPLE, [fragment], ["workers.num_decode=7", "router.policy=round_robin"])
    assert config.security.tokens == {"tok-a": "tenant-a"}
    assert config.workers.num_decode == 7          # --set wins over the fragment
    assert config.workers.num_prefill == 2         # untouched field kept from the base
    assert config.router.policy == "round_robin"


def test_written_file_round_trips_through_load_config_with_mode_0600(tmp_path):
    config = render_config(EXAMPLE, sets=["redis_url=redis://10.1.2.3:6380/0"])
    out = tmp_path / "sub" / "cluster.yaml"
    write_config(config, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert load_config(out) == config
    assert load_config(out).redis_url == "redis://10.1.2.3:6380/0"


@pytest.mark.parametrize("assignment, field", [
    ("workers.num_prefill=0", "workers.num_prefill"),
    ("store.host.policy=fifo", "store.host.policy"),
    ("router.port=not-a-port", "router.port"),
    ("store.colour=blue", "store.colour"),
])
def test_bad_override_names_the_field(assignment, field):
    with pytest.raises(ConfigError) as err:
        render_config(EXAMPLE, sets=[assignment])
    assert err.value.path == field


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("a.b=8") == ("a.b", 8)
    assert parse_assignment("a=true") == ("a", True)
    assert parse_assignment("u=redis://:pw@h:1/0") == ("u", "redis://:pw@h:1/0")
    with pytest.raises(ConfigError):
        parse_assignment("no-equals-sign")


def test_deep_merge_does_not_touch_its_inputs():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = deep_merge(base, {"a": {"b": 9}, "d": [2]})
    assert merged == {"a": {"b": 9, "c": 2}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_cli_renders_and_rejects(tmp_path):
    out = tmp_path / "cluster.yaml"
    cmd = [sys.executable, "-m", "kvcluster.deploy_config", "render", str(EXAMPLE)]
    ok = subprocess.run(cmd + ["--set", "workers.num_prefill=3", "-o", str(out)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(out.read_text())["workers"]["num_prefill"] == 3
    bad = subprocess.run(cmd + ["--set", "engine.block_size=-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "engine.block_size" in bad.stderr


def _serve_invocations() -> list[list[str]]:
    """Every `kvcluster serve ...` the deployments run (Ray YAMLs, chart templates, Dockerfiles)."""
    import re
    import shlex

    sources = [*(REPO / "deploy" / "ray").glob("*.yaml"),
               *(REPO / "deploy" / "helm" / "kvcluster" / "templates").glob("*.yaml")]
    found = []
    for path in sources:
        text = re.sub(r"\{\{-? */\*.*?\*/ *-?\}\}", "", path.read_text(), flags=re.S)  # template comments
        text = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
        text = re.sub(r"\{\{[^}]*\}\}", "/x", text)
        found += [shlex.split(m)[1:] for m in re.findall(r"kvcluster serve[^&>\n'\"]*", text)]
    for dockerfile in (REPO / "deploy" / "docker").glob("Dockerfile*"):
        if dockerfile.suffix != ".dockerignore":
            (cmd,) = re.findall(r'^CMD (\[.*\])$', dockerfile.read_text(), flags=re.M)
            found.append(yaml.safe_load(cmd))
    return found


def test_kvcluster_serve_accepts_every_invocation_the_deployments_use():
    from kvcluster.cli import _build_parser

    invocations = _serve_invocations()
    assert len(invocations) == 5  # 2 Ray YAMLs, the chart's router, 2 Dockerfiles
    parser = _build_parser()
    try:
        parser.parse_args(["serve", "--help"])
    except SystemExit as exc:
        if exc.code != 0:
            pytest.skip("`kvcluster serve` is not in kvcluster/cli.py yet; invocations: "
                        + "; ".join(" ".join(argv) for argv in invocations))
    for argv in invocations:
        parser.parse_args(argv)  # SystemExit(2) on an unknown flag or role
