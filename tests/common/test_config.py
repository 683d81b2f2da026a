import subprocess
import sys

import pytest

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict, load_config


def test_defaults_are_valid():
    cfg = ClusterConfig()
    assert cfg.store.chunk_tokens % cfg.engine.block_size == 0


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  block_size: 32\nstore:\n  chunk_tokens: 512\n"
                    "  host:\n    capacity_bytes: 1048576\n    policy: s3fifo\n"
                    "transfer:\n  slo_ms: 250\nsecurity:\n  tokens: {abc: tenant-a}\n")
    cfg = load_config(path)
    assert cfg.engine.block_size == 32
    assert cfg.store.host.policy == "s3fifo"
    assert cfg.transfer.slo_ms == 250.0
    assert cfg.security.tokens == {"abc": "tenant-a"}


@pytest.mark.parametrize("data, field", [
    ({"store": {"host": {"capacity_bytes": "lots"}}}, "store.host.capacity_bytes"),
    ({"store": {"host": {"capacity_bytes": 0}}}, "store.host.capacity_bytes"),
    ({"router": {"policy": "random"}}, "router.policy"),
    ({"engine": {"blok_size": 16}}, "engine.blok_size"),
    ({"engine": {"block_size": True}}, "engine.block_size"),
    ({"store": {"chunk_tokens": 100}}, "store.chunk_tokens"),
    ({"security": {"tokens": {"t": 3}}}, "security.tokens[t]"),
    ({"workers": []}, "workers"),
])
def test_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        from_dict(ClusterConfig, data)
    assert info.value.path == field


def test_cli_config_check(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("router: {policy: round_robin}\n")
    bad.write_text("router: {policy: nope}\n")
    run = lambda p: subprocess.run([sys.executable, "-m", "kvcluster", "config", "check", str(p)],
                                   capture_output=True, text=True)
    assert run(good).returncode == 0
    out = run(bad)
    assert out.returncode == 1 and "router.policy" in out.stderr


def test_common_never_imports_torch():
    code = ("import sys, kvcluster.common, kvcluster.common.config;"
            "assert 'torch' not in sys.modules, 'common imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
