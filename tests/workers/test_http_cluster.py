"""The OpenAI-compatible API over the real Ray cluster backend (prefill + decode actors),
as ``kvcluster serve`` starts it: one cluster for the module, the official SDK."""

from __future__ import annotations

import os
import time

import httpx2 as httpx
import openai
import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from tests.workers.conftest import tiny_config

ray = pytest.importorskip("ray")

DOC = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 byte tokens


@pytest.fixture(scope="module")
def cluster(tiny_model):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = tiny_config(tiny_model, workers={"num_prefill": 1, "num_decode": 1},
                         router={"port": 0, "metrics_port": 0})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    yield handle
    handle.close()
    ray.shutdown()


def _client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def test_sdk_streams_through_prefill_and_decode_with_cached_tokens(cluster, tiny_model):
    client = _client(cluster)
    assert [m.id for m in client.models.list().data] == [str(tiny_model), "tiny-llama"]
    first = client.completions.create(model="tiny-llama", prompt=DOC + "Question one?",
                                      max_tokens=6, temperature=0)
    assert first.kvcluster["prefill_instance"] == "prefill-0"
    assert first.kvcluster["decode_instance"] == "decode-0"
    with KVClusterClient(cluster.address) as grpc_client:
        same = grpc_client.generate(DOC + "Question one?", params=SamplingParams(max_new_tokens=6),
                                    timeout_s=60)
    assert first.choices[0].text == same.text  # greedy, either API
    chunks = list(client.completions.create(
        model="tiny-llama", prompt=DOC + "Question two?", max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 6
    # the shared document's whole store chunks (16 tokens) came from the cluster's caches
    assert usage.prompt_tokens_details.cached_tokens >= 128
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_disconnect_mid_stream_cancels_the_decode_task(cluster):
    decode = cluster.cluster.pools.decode[0]
    finished_before = _decode_requests_ok(decode)
    body = {"model": "tiny-llama", "prompt": DOC + "A long answer, please.", "max_tokens": 350,
            "stream": True}
    with httpx.stream("POST", f"http://{cluster.http_address}/v1/completions", json=body,
                      timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    end = time.monotonic() + 20
    while ray.get(decode.actor.poll.remote(False), timeout=10)[0].active_decode_requests:
        assert time.monotonic() < end, "the decode actor still runs the request"
        time.sleep(0.05)
    metrics = httpx.get(f"http://{cluster.http_address}/metrics").text
    assert 'kvcluster_frontend_requests_total{code="CANCELLED"} 1.0' in metrics
    assert "kvcluster_router_decisions_total{" in metrics  # the router's registry too
    assert _decode_requests_ok(decode) == finished_before  # ended early, not decoded to the end


def _decode_requests_ok(decode) -> float:
    """Decode tasks the actor finished in full (its own /metrics)."""
    address = ray.get(decode.actor.stats.remote(), timeout=10)["metrics_address"]
    for line in httpx.get(f"http://{address}/metrics").text.splitlines():
        if line.startswith("kvcluster_worker_requests_total{") and 'outcome="ok"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
