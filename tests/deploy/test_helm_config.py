"""The Helm chart's cluster file and wiring: the ConfigMap's cluster.yaml (alone and
completed by the Secret's fragment) passes load_config, the pods' start scripts
parse and render it, and ports, selectors, probes, GPUs and volumes agree."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvcluster.common.config import ConfigError, load_config
from kvcluster.deploy_config import render_config
from kvcluster.transfer.security import INTERNAL_PEER, ChannelSecurity, ServerSecurity
from tests.deploy.chart import (VARIANTS, all_containers, chart_values, configmap_cluster_yaml,
                                first_container, helm_template, one, secret_data, write)


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_cluster_yaml_passes_load_config(rendered, variant, tmp_path):
    docs = rendered(variant)
    config = load_config(write(tmp_path / "cluster.yaml", configmap_cluster_yaml(docs)))
    values = chart_values(variant)
    assert config.workers.num_prefill == values["ray"]["prefill"]["replicas"]
    assert config.workers.num_decode == values["ray"]["decode"]["replicas"]
    assert (config.router.host, config.router.port) == ("0.0.0.0", values["router"]["grpcPort"])
    assert config.router.metrics_port == values["router"]["metricsPort"]
    assert config.router.http_port == values["router"]["httpPort"]
    assert config.store.host.capacity_bytes == values["store"]["host"]["capacityGiB"] << 30
    assert config.store.disk.enabled == values["store"]["disk"]["enabled"]
    assert config.security.tokens == {}  # tokens only ever in the Secret
    assert config.router.policy == values["config"]["router"]["policy"]
    several = values["router"]["replicas"] > 1  # replicas share detached pools
    assert config.workers.detached == several
    strategy = one(docs, "Deployment")["spec"]["strategy"]["type"]
    assert strategy == ("RollingUpdate" if several else "Recreate")


@pytest.mark.parametrize("variant", VARIANTS)
def test_secret_fragment_completes_the_file(rendered, variant, tmp_path):
    """ConfigMap + the Secret the pods mount -> the full file; Redis gets the password it runs with."""
    docs = rendered(variant)
    values = chart_values(variant)
    base = write(tmp_path / "cluster.yaml", configmap_cluster_yaml(docs))
    mounted = secret_data(docs, _mounted_secret_name(one(docs, "Deployment")))
    config = render_config(base, [write(tmp_path / "security.yaml", mounted["security.yaml"])])
    assert config.security.tokens == values["security"]["tokens"]
    public = configmap_cluster_yaml(docs)
    assert not any(token in public for token in values["security"]["tokens"])  # no secret in the ConfigMap
    if values["redis"]["enabled"]:
        redis_env = first_container(one(docs, "StatefulSet"))["env"][0]
        assert redis_env["name"] == "REDIS_PASSWORD"
        password = secret_data(docs, redis_env["valueFrom"]["secretKeyRef"]["name"])["redis-password"]
        service = one(docs, "Service", component="redis")
        host = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        assert password not in public
        assert config.redis_url == f"redis://:{password}@{host}/0"
        assert config.store.redis.url == f"redis://:{password}@{host}/1"
    else:
        assert config.redis_url == values["redis"]["externalURL"] + "/0"


def test_bad_config_section_is_caught_by_load_config(helm, tmp_path):
    done = helm_template(helm, tmp_path, {"config": {"engine": {"block_size": 0}}})
    assert done.returncode == 0, done.stderr  # free-form section: helm cannot know
    text = configmap_cluster_yaml([d for d in yaml.safe_load_all(done.stdout) if d])
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "cluster.yaml", text))
    assert err.value.path == "engine.block_size"


def test_router_start_script_renders_the_file_joins_ray_and_serves(rendered, tmp_path):
    """Run the render line of the router's start script with the pod's paths moved under tmp."""
    docs = rendered("full")
    script = first_container(one(docs, "Deployment"))["args"][0]
    (line,) = [ln.strip() for ln in script.splitlines() if "kvcluster.deploy_config render" in ln]
    etc, run = tmp_path / "etc", tmp_path / "run"
    write(etc / "config" / "cluster.yaml", configmap_cluster_yaml(docs))
    secret = secret_data(docs, _mounted_secret_name(one(docs, "Deployment")))
    write(etc / "secret" / "security.yaml", secret["security.yaml"])
    line = line.replace("/etc/kvcluster", str(etc)).replace("/run/kvcluster", str(run))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = load_config(run / "cluster.yaml")
    assert config.security.tokens == VARIANTS["full"]["security"]["tokens"]
    assert oct((run / "cluster.yaml").stat().st_mode & 0o777) == "0o600"
    head_service = f"{one(docs, 'RayCluster')['metadata']['name']}-head-svc:6379"
    assert f"head={head_service}" in script
    assert "--num-cpus=0 --num-gpus=0" in script  # no actor ever lands on the router's node
    assert script.index("kvcluster-wait-pools --config /run/kvcluster/cluster.yaml") < script.index(
        "exec kvcluster serve")
    assert script.rstrip().endswith(
        "exec kvcluster serve --config /run/kvcluster/cluster.yaml --ray-address auto")


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_token_is_shared_by_kuberay_and_the_router(rendered, variant):
    docs = rendered(variant)
    auth = one(docs, "RayCluster")["spec"]["authOptions"]
    env = {e["name"]: e for e in first_container(one(docs, "Deployment"))["env"]}
    if chart_values(variant)["ray"]["auth"]["mode"] == "disabled":
        assert auth == {"mode": "disabled"}
        assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env
        assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-ray-auth")]
        return
    assert auth["mode"] == "token"
    token = secret_data(docs, auth["secretName"])["auth_token"]
    assert len(token) >= 32
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_script_parses(rendered, variant):
    """`bash -n` / `sh -n` on each container's inline script (syntax only, nothing runs)."""
    scripts = 0
    for doc in rendered(variant):
        for container in all_containers(doc):
            command, args = container.get("command", []), container.get("args", [])
            if command[:1] in (["/bin/bash"], ["/bin/sh"]) and "-c" in command:
                shell = command[0]
                done = subprocess.run([shell, "-n", "-c", (args or command[-1:])[0]],
                                      capture_output=True, text=True, timeout=30)
                assert done.returncode == 0, (doc["kind"], container["name"], done.stderr)
                scripts += 1
    assert scripts >= 1  # the router (+ redis when enabled); KubeRay writes the Ray pods' command


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_groups_pin_pools_gpus_and_volumes(rendered, variant):
    docs = rendered(variant)
    values = chart_values(variant)
    config = yaml.safe_load(configmap_cluster_yaml(docs))
    groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for pool, group in groups.items():
        # KubeRay pastes the value into `ray start --resources=...`; the start script evals it.
        (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
        assert json.loads(arg.split("=", 1)[1]) == {f"{pool}_pool": 1}
        assert group["replicas"] == values["ray"][pool]["replicas"]
        container = first_container(group)
        gpus = values["ray"][pool]["gpus"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert "command" not in container and "args" not in container  # KubeRay's `ray start`
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        shm = values["store"]["host"]["capacityGiB"] + values["store"]["host"]["shmExtraGiB"]
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{shm}Gi"}
        assert mounts["dshm"] == "/dev/shm"
        assert ("kv-disk" in volumes) == values["store"]["disk"]["enabled"]
        if values["store"]["disk"]["enabled"]:
            assert mounts["kv-disk"] == config["store"]["disk"]["directory"]
            kind = values["store"]["disk"]["volume"]["type"]
            assert kind in volumes["kv-disk"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["kv-transfer"] == config["transfer"]["port"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_and_budgets_select_the_right_pods(rendered, variant):
    docs = rendered(variant)
    pod_labels = {
        "router": one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"],
        **{g["groupName"]: g["template"]["metadata"]["labels"]
           for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]},
    }
    if chart_values(variant)["redis"]["enabled"]:
        pod_labels["redis"] = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        component = pdb["metadata"]["labels"]["app.kubernetes.io/component"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels[component].items()
        assert "maxUnavailable" not in pdb["spec"]  # RayCluster pods need an integer minAvailable
    for service in (d for d in docs if d["kind"] == "Service"):
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        assert service["spec"]["selector"].items() <= pod_labels[component].items()
    router = first_container(one(docs, "Deployment"))
    named = {p["name"]: p["containerPort"] for p in router["ports"]}
    service = one(docs, "Service", component="router")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(named)
    http_port = chart_values(variant)["router"]["httpPort"]
    http = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert [(p["port"], p["targetPort"]) for p in http] == [(http_port, "http")]
    assert named["http"] == http_port  # the port `kvcluster serve` binds (router.http_port)
    tls = chart_values(variant)["security"]["tls"]["enabled"]
    assert http[0]["appProtocol"] == ("https" if tls else "http")


def test_router_probes_use_native_grpc_health_without_tls(rendered):
    router = first_container(one(rendered("default"), "Deployment"))
    port = {p["name"]: p["containerPort"] for p in router["ports"]}["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert router[probe]["grpc"] == {"port": port, "service": ""}


def test_router_probes_use_the_tls_healthcheck_with_tls(rendered):
    docs = rendered("full")
    router = first_container(one(docs, "Deployment"))
    config = yaml.safe_load(configmap_cluster_yaml(docs))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = router[probe]["exec"]["command"]
        assert command[0] == "kvcluster-healthcheck"
        assert command[command.index("--addr") + 1] == "127.0.0.1:8443"
        assert command[command.index("--tls-cert") + 1] == config["security"]["tls_cert"]
    tls_secret = one(docs, "Secret", component="tls")
    mount = {m["name"]: m["mountPath"] for m in router["volumeMounts"]}["tls"]
    for field in ("tls_cert", "tls_key", "tls_ca"):
        path = Path(config["security"][field])
        assert str(path.parent) == mount and path.name in tls_secret["data"]


def test_helm_test_hook_checks_router_health(rendered):
    pod = one(rendered("default"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["kvcluster-healthcheck", "--addr", "release-kvcluster-router:50051"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_internal_token_is_a_secret_mounted_into_the_workers_only(rendered, variant):
    """The workers' own credential: a Kubernetes Secret (given, kept or generated), a file
    in every prefill and decode pod that cluster.yaml points at; never in the ConfigMap,
    the router pod or the fragment whose config crosses Ray."""
    docs = rendered(variant)
    internal = chart_values(variant)["security"]["internal"]
    config = load_config(write_tmp(configmap_cluster_yaml(docs)))
    token_file = Path(config.security.internal_token_file)
    assert config.security.internal_token == ""
    secret_name = internal["existingSecret"] or _mounted_secret_name(one(docs, "Deployment"))
    key = internal["existingSecretKey"] if internal["existingSecret"] else "internal-token"
    for group in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m for m in first_container(group)["volumeMounts"]}
        assert volumes["internal"]["secret"]["secretName"] == secret_name
        assert volumes["internal"]["secret"]["items"] == [{"key": key, "path": token_file.name}]
        assert mounts["internal"] == {"name": "internal", "mountPath": str(token_file.parent),
                                      "readOnly": True}
        assert "tls" not in volumes  # the front end's key stays with the front end
    router = one(docs, "Deployment")["spec"]["template"]["spec"]
    internal_tls = internal["tls"]["existingSecret"]
    for volume in (v["secret"] for v in router["volumes"] if "secret" in v):
        assert volume["secretName"] != internal_tls
        if volume["secretName"] == secret_name:  # the chart's Secret: only the fragment
            assert [item["key"] for item in volume["items"]] == ["security.yaml"]
    if internal["existingSecret"]:
        assert "internal-token" not in secret_data(docs, _mounted_secret_name(
            one(docs, "Deployment")))
        return
    token = secret_data(docs, secret_name)["internal-token"]
    assert token == (internal["token"] or token) and len(token) >= 32
    fragment = secret_data(docs, secret_name)["security.yaml"]
    assert token not in configmap_cluster_yaml(docs) and token not in fragment
    assert token not in yaml.safe_dump(chart_values(variant)["security"]["tokens"])


def test_workers_read_the_mounted_token_as_their_credential(rendered, tmp_path):
    """What a worker pod does with the chart's file: the receiver takes only that token."""
    docs = rendered("default")
    token = secret_data(docs, _mounted_secret_name(one(docs, "Deployment")))["internal-token"]
    text = configmap_cluster_yaml(docs).replace("/etc/kvcluster/internal", str(tmp_path))
    write(tmp_path / "token", token)
    config = load_config(write(tmp_path / "cluster.yaml", text))
    assert ServerSecurity.internal(config.security).tokens == {token: INTERNAL_PEER}
    assert ChannelSecurity.internal(config.security).metadata() == (
        ("authorization", f"Bearer {token}"),)


def test_internal_mutual_tls_comes_from_its_own_secret(rendered):
    docs = rendered("full")
    config = yaml.safe_load(configmap_cluster_yaml(docs))["security"]
    itls = VARIANTS["full"]["security"]["internal"]["tls"]
    assert config["internal_tls_server_name"] == itls["serverName"]
    for group in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in first_container(group)["volumeMounts"]}
        assert volumes["internal-tls"]["secret"]["secretName"] == itls["existingSecret"]
        for field, name in (("internal_tls_cert", "tls.crt"), ("internal_tls_key", "tls.key"),
                            ("internal_tls_ca", "ca.crt")):
            assert config[field] == f"{mounts['internal-tls']}/{name}"
    assert config["tls_ca"] != config["internal_tls_ca"]  # tenants' CA is not the cluster's


def test_internal_tls_without_its_secret_fails_the_render(helm, tmp_path):
    done = helm_template(helm, tmp_path, {"security": {"internal": {"tls": {"enabled": True}}}})
    assert done.returncode != 0 and "security.internal.tls.enabled needs" in done.stderr


def write_tmp(text: str) -> Path:
    import tempfile

    return write(Path(tempfile.mkdtemp()) / "cluster.yaml", text)


def _mounted_secret_name(workload: dict) -> str:
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "secret"]
    return volume["secret"]["secretName"]
