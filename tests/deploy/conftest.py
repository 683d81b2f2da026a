"""Fixtures for the Helm chart tests: the helm binary, rendered value sets, KubeRay's CRD schema."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from tests.deploy.chart import CRD_FILE, VARIANTS, HelmUnavailable, helm_binary, helm_template, strict


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return str(helm_binary())
    except HelmUnavailable as exc:
        pytest.skip(f"no helm binary, the chart is NOT rendered: {exc}")


@pytest.fixture(scope="session")
def rendered(helm, tmp_path_factory):
    """variant name -> list of rendered manifests (each rendered once per session)."""
    cache: dict[str, list[dict]] = {}

    def render(variant: str) -> list[dict]:
        if variant not in cache:
            done = helm_template(helm, tmp_path_factory.mktemp(variant), VARIANTS[variant])
            assert done.returncode == 0, done.stderr
            cache[variant] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return cache[variant]

    return render


@pytest.fixture(scope="session")
def kuberay() -> jsonschema.Draft4Validator:
    """A validator for KubeRay's RayCluster v1 schema (built once: the schema is ~1 MB)."""
    if not CRD_FILE.exists():
        pytest.skip(f"KubeRay CRD not found at {CRD_FILE}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD_FILE.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    # OpenAPI v3 schemas are a JSON Schema draft-4 dialect.
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))
