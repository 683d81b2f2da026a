"""One small real cluster per module, and a /metrics scraper."""

from __future__ import annotations

import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.workers.conftest import tiny_config, tiny_model  # noqa: F401 - fixture reuse

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tiny_model):  # noqa: F811
    from kvcluster.runtime.launcher import ClusterThread

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = tiny_config(tiny_model, workers={"num_prefill": 1, "num_decode": 1, "max_queue": 64},
                         router={"port": 0, "metrics_port": 0},
                         limits={"requests_per_s": 10_000.0, "burst": 10_000})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    yield handle
    handle.close()
    ray.shutdown()


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """GET http://address/metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of every sample of ``name`` that has ``label``."""
    return {dict(k[1])[label]: v for k, v in samples.items()
            if k[0] == name and label in dict(k[1])}
