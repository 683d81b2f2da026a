"""Shared by the Helm chart tests: value sets, `helm template`, and manifest lookups."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kvcluster"
CRD_FILE = REPO.parent / "shared" / "kuberay-crds" / "ray.io_rayclusters.yaml"

sys.path.insert(0, str(REPO / "deploy" / "tools"))
from fetch_helm import HelmUnavailable, helm_binary  # noqa: E402,F401  (re-exported)

PEM = "-----BEGIN CERTIFICATE-----\nMIIBdummy\n-----END CERTIFICATE-----\n"
INTERNAL_TOKEN = "internal-cccccccccccccccccccccccccccccccc"
VARIANTS = {
    "default": {},
    "full": {
        "fullnameOverride": "kvc",
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "inference"},
        "ray": {"auth": {"mode": "disabled"}, "head": {"rayStartParams": {"dashboard-host": "0.0.0.0"}},
                "prefill": {"replicas": 3, "gpus": 2}, "decode": {"replicas": 1, "maxUnavailable": 0}},
        "store": {"host": {"capacityGiB": 16, "shmExtraGiB": 4},
                  "disk": {"capacityGiB": 200, "volume": {"type": "ephemeral", "storageClassName": "local-nvme"}}},
        "router": {"replicas": 2, "grpcPort": 8443, "httpPort": 8080, "metricsPort": 9100,
                   "service": {"type": "LoadBalancer"}},
        "redis": {"persistence": {"enabled": False}, "auth": {"password": "s3cret-pass"}},
        "security": {"tokens": {"tok-aaaaaaaaaaaaaaaa": "tenant-a", "tok-bbbbbbbbbbbbbbbb": "tenant-b"},
                     "tls": {"enabled": True, "mutual": True, "cert": PEM, "key": "KEY", "ca": PEM},
                     "internal": {"token": INTERNAL_TOKEN,
                                  "tls": {"enabled": True, "existingSecret": "kvc-internal-tls",
                                          "serverName": "kvcluster-worker"}}},
        "config": {"router": {"policy": "least_loaded"}, "engine": {"num_blocks": 1024}},
    },
    "external-redis": {
        "redis": {"enabled": False, "externalURL": "redis://:pw@redis.example.internal:6379"},
        "store": {"disk": {"enabled": False}},
        "security": {"tls": {"enabled": True, "existingSecret": "kvcluster-tls"},
                     "internal": {"existingSecret": "kv-internal", "existingSecretKey": "secret"}},
    },
}


def helm_template(helm: str, tmp_path: Path, overrides: dict) -> subprocess.CompletedProcess:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(overrides))
    return subprocess.run([helm, "template", "release", str(CHART), "--namespace", "kv", "-f", str(values)],
                          capture_output=True, text=True, timeout=60)


def chart_values(variant: str) -> dict:
    from kvcluster.deploy_config import deep_merge

    return deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), VARIANTS[variant])


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (component is None or
             d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{len(found)} {kind} ({component})"
    return found[0]


def first_container(workload: dict) -> dict:
    """First container of a Deployment, a RayCluster's head, or one worker group."""
    spec = workload.get("spec", workload)
    template = spec["headGroupSpec"]["template"] if "headGroupSpec" in spec else spec["template"]
    return template["spec"]["containers"][0]


def all_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "Pod":
        return spec["containers"]
    if doc["kind"] == "RayCluster":
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if "template" in spec:
        return spec["template"]["spec"]["containers"]
    return []


def configmap_cluster_yaml(docs: list[dict]) -> str:
    return one(docs, "ConfigMap")["data"]["cluster.yaml"]


def secret_data(docs: list[dict], name: str) -> dict[str, str]:
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def strict(schema):
    """The CRD schema as the API server's strict field validation applies it:
    an object that lists its properties rejects any other field, unless it
    preserves unknown fields or says what extra fields may hold."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":  # a mapping of field name -> schema, not a schema itself
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out
