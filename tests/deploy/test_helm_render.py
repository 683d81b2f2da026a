"""deploy/helm/kvcluster rendered by the real `helm` (v4, extracted from a PyPI wheel).

`helm lint` and `helm template` run for real; every rendered manifest is validated
against the Kubernetes schema (kubernetes-validate, strict: unknown fields fail),
the RayCluster against KubeRay's CRD schema (../shared/kuberay-crds), and
values.schema.json is shown rejecting bad values. Without a helm binary these
tests skip and say why; the values schema is still checked with jsonschema.
"""

from __future__ import annotations

import copy
import json
import subprocess

import jsonschema
import pytest
import yaml

from tests.deploy.chart import (CHART, PEM, VARIANTS, HelmUnavailable, helm_binary, helm_template,
                                one)

K8S_VERSIONS = ["1.27", "1.33"]  # the chart's minimum (native gRPC probes GA) and a current one


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lintstrict(helm, variant, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VARIANTS[variant]))
    done = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(values)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_default_render_has_every_part(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered("default"))
    assert kinds == [
        ("ConfigMap", "release-kvcluster-config"),
        ("Deployment", "release-kvcluster-router"),
        ("Pod", "release-kvcluster-test-health"),
        ("PodDisruptionBudget", "release-kvcluster-decode"),
        ("PodDisruptionBudget", "release-kvcluster-prefill"),
        ("PodDisruptionBudget", "release-kvcluster-router"),
        ("RayCluster", "release-kvcluster"),
        ("Secret", "release-kvcluster-ray-auth"),
        ("Secret", "release-kvcluster-secret"),
        ("Service", "release-kvcluster-redis"),
        ("Service", "release-kvcluster-router"),
        ("StatefulSet", "release-kvcluster-redis"),
    ]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_against_kubernetes(rendered, variant, k8s_version):
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for doc in rendered(variant):
        if doc["kind"] == "RayCluster":
            continue  # a custom resource: checked against KubeRay's CRD below
        kv.validate(doc, k8s_version, strict=True)
        checked += 1
    assert checked >= 8


def test_kubernetes_validation_catches_a_bad_manifest(rendered):
    kv = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(one(rendered("default"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raycluster_validates_against_kuberay_crd(rendered, kuberay, variant):
    cluster = one(rendered(variant), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    kuberay.validate(cluster)


@pytest.mark.parametrize("path, value", [
    (("spec", "workerGroupSpecs", 0, "replicas"), "two"),
    (("spec", "workerGroupSpecs", 0, "groupNmae"), "typo"),
    (("spec", "authOptions", "mode"), "password"),
    (("spec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicy"), 7),
])
def test_kuberay_crd_schema_rejects_a_broken_raycluster(rendered, kuberay, path, value):
    cluster = copy.deepcopy(one(rendered("default"), "RayCluster"))
    node = cluster
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        kuberay.validate(cluster)


# ---------------------------------------------------------------- values.schema.json


@pytest.mark.parametrize("override, where", [
    ({"ray": {"prefill": {"gpus": 0}}}, "/ray/prefill/gpus"),
    ({"router": {"grpcPort": 70000}}, "/router/grpcPort"),
    ({"router": {"httpPort": 0}}, "/router/httpPort"),
    ({"router": {"replicas": "two"}}, "/router/replicas"),
    ({"router": {"replicas": 0}}, "/router/replicas"),
    ({"ray": {"auth": {"token": "too-short"}}}, "/ray/auth/token"),
    ({"store": {"disk": {"volume": {"type": "hostPath"}}}}, "/store/disk/volume/type"),
    ({"store": {"hots": {"capacityGiB": 4}}}, "hots"),
    ({"ray": {"auth": {"mode": "password"}}}, "/ray/auth/mode"),
    ({"security": {"tokens": {"short": "tenant"}}}, "propertyName 'short'"),
    ({"config": {"modle": {"path": "x"}}}, "modle"),
    ({"redis": {"externalURL": "http://redis:6379"}}, "/redis/externalURL"),
    ({"security": {"internal": {"token": "too-short"}}}, "/security/internal/token"),
])
def test_helm_rejects_bad_values_by_schema(helm, tmp_path, override, where):
    done = helm_template(helm, tmp_path, override)
    assert done.returncode != 0
    assert "don't meet the specifications of the schema" in done.stderr
    assert where in done.stderr


@pytest.mark.parametrize("override, message", [
    ({"security": {"tls": {"enabled": True}}}, "security.tls.enabled needs"),
    ({"security": {"tls": {"enabled": True, "mutual": True, "cert": PEM, "key": "K"}}}, "needs security.tls.ca"),
    ({"redis": {"enabled": False}}, "needs redis.externalURL"),
])
def test_helm_fails_on_inconsistentvalues(helm, tmp_path, override, message):
    done = helm_template(helm, tmp_path, override)
    assert done.returncode != 0 and message in done.stderr


def test_values_yaml_satisfies_values_schema_without_helm():
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator.validate(values)
    values["router"]["metricsPort"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(values)



def test_fetch_helm_extracts_a_working_helm_v4(tmp_path):
    try:
        helm = helm_binary(tmp_path / "cache")
    except HelmUnavailable as exc:
        pytest.skip(f"no helm binary: {exc}")
    assert helm.is_relative_to(tmp_path / "cache")
    done = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("v4."), done.stdout + done.stderr


def test_fetch_helm_says_why_when_the_wheel_is_missing(monkeypatch, tmp_path):
    import fetch_helm  # on sys.path through tests.deploy.chart

    monkeypatch.setattr(fetch_helm, "DIST_NAME", "no-such-distribution-kvcluster")
    with pytest.raises(HelmUnavailable, match="is not installed"):
        fetch_helm.helm_binary(tmp_path)


@pytest.mark.parametrize("kube_version, ok", [("1.26.0", False), ("1.27.0", True), ("1.33.2", True)])
def test_chart_requires_kubernetes_with_native_grpc_probes(helm, kube_version, ok):
    done = subprocess.run([helm, "template", "release", str(CHART), "--kube-version", kube_version],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) == ok, done.stderr
    if not ok:
        assert "chart requires kubeVersion: >=1.27.0-0" in done.stderr
