"""``engine.kind: vllm`` served as ``kvcluster serve`` serves it: Ray pools (one colocated
vLLM decode actor with kvcluster's connector), the gRPC API and the OpenAI-compatible HTTP
API; greedy output against stock vLLM's; a prefix evicted from vLLM's KV cache served
from the host tier; our error codes; a closed stream aborted inside vLLM.

One cluster (one vLLM engine) for the module; stock vLLM ran and stopped before it.
"""

from __future__ import annotations

import time

import grpc
import openai
import pytest

from kvcluster.client import KVClusterClient
from kvcluster.client.sync_client import GenerateError
from kvcluster.common.hashing import ExtraKeys
from kvcluster.common.sampling import SamplingParams
from kvcluster.runtime.launcher import ClusterThread
from tests.integrations.vllm.conftest import CHUNK_TOKENS, MAX_NEW_TOKENS, vllm_config

ray = pytest.importorskip("ray")
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def cluster(stock_outputs):  # stock vLLM first, and stopped: one engine at a time
    handle = ClusterThread(vllm_config(), num_cpus=2, start_timeout_s=300)
    yield handle
    handle.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def grpc_client(cluster):
    with KVClusterClient(cluster.address) as client:
        yield client


def _http(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="unused",
                         max_retries=0, timeout=120)


def _generate(client, ids, tenant="acme", **params):
    sampling = SamplingParams(**{"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0,
                                 **params})
    return client.generate(token_ids=ids, params=sampling, tenant=tenant, timeout_s=120)


def test_greedy_tokens_over_grpc_equal_stock_vllm(grpc_client, prompts, stock_outputs):
    for name in ("short", "long"):
        result = _generate(grpc_client, prompts[name])
        assert result.token_ids == stock_outputs[name], name
        assert result.final.decode_instance == "decode-0"
        assert result.final.num_prompt_tokens == len(prompts[name])


def test_greedy_text_over_http_equals_stock_vllm(cluster, prompts, stock_outputs, tokenizer):
    client = _http(cluster)
    model = client.models.list().data[0].id
    chunks = list(client.completions.create(
        model=model, prompt=prompts["short"], max_tokens=MAX_NEW_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tokenizer.decode(stock_outputs["short"])
    assert chunks[-1].usage.completion_tokens == len(stock_outputs["short"])


def test_evicted_prefix_comes_back_from_the_host_tier(cluster, grpc_client, prompts,
                                                      stock_outputs):
    """``long`` is stored in the host tier while computed; two prompts as long evict it
    from vLLM's 40 blocks; asked again, the connector loads its two whole chunks
    (vLLM counts them as cached: not prefilled) and the greedy tokens are stock's."""
    tenant = "evict-tenant"  # no other test's blocks share its salt
    decode = cluster.cluster.pools.decode[0]
    first = _generate(grpc_client, prompts["long"], tenant=tenant)
    assert first.final.num_cached_tokens == 0
    again = _generate(grpc_client, prompts["long"], tenant=tenant)
    assert again.final.cached_tokens_by_tier == {"prefix_cache": again.final.num_cached_tokens}
    assert again.final.num_cached_tokens >= 2 * CHUNK_TOKENS  # vLLM's own blocks, held
    for name in ("evict_1", "evict_2"):
        _generate(grpc_client, prompts[name], tenant=tenant)
    back = _generate(grpc_client, prompts["long"], tenant=tenant)
    assert back.token_ids == stock_outputs["long"] == first.token_ids
    assert back.final.cached_tokens_by_tier.get("host") == 2 * CHUNK_TOKENS
    assert back.final.num_cached_tokens == sum(back.final.cached_tokens_by_tier.values())
    assert back.final.num_cached_tokens >= 2 * CHUNK_TOKENS
    host = ray.get(decode.actor.stats.remote(), timeout=30)["tiers"]["host"]
    assert host["used_bytes"] > 0 and host["hits"] >= 2  # kvcluster status sees the tier


def test_the_router_learns_the_prefix_from_vllms_kv_events(cluster, grpc_client, prompts):
    """vLLM's own event stream (its blocks, re-hashed by router.vllm_subscriber, and the
    connector's tier events) tells the decode router that decode-0 holds the prompt's
    whole chunks; another tenant's salt matches nothing."""
    backend = cluster.cluster.backend
    assert set(backend.kv_events) == {"decode"}
    _generate(grpc_client, prompts["long"], tenant="routed")
    decode = cluster.cluster.pools.decode[0]

    def lacking(tenant: str) -> int:
        route = backend.routers["decode"].request_for(
            prompts["long"], ExtraKeys(backend.model_id, tenant), "probe")
        assert len(route.block_hashes) == 2  # two whole store chunks
        return backend._uncached_on(decode, route)

    deadline = time.monotonic() + 10
    while lacking("routed"):
        assert time.monotonic() < deadline, "the index never learned the prefix"
        time.sleep(0.1)
    assert lacking("nobody") == 2 * CHUNK_TOKENS
    assert backend.kv_events["decode"].stats("decode-0")["batches"] > 0


def test_the_tenant_salts_vllms_prefix_cache(grpc_client, prompts):
    _generate(grpc_client, prompts["short"], tenant="tenant-a")
    same = _generate(grpc_client, prompts["short"], tenant="tenant-a")
    other = _generate(grpc_client, prompts["short"], tenant="tenant-b")
    assert same.final.num_cached_tokens > 0
    assert other.final.num_cached_tokens == 0  # another tenant never reads its blocks


def test_a_prompt_longer_than_the_engine_is_invalid_argument(cluster, grpc_client):
    with pytest.raises(GenerateError) as caught:
        _generate(grpc_client, [100] * 3000)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.BadRequestError):
        _http(cluster).completions.create(model="smollm2", prompt=[100] * 3000, max_tokens=4)


def test_a_full_queue_is_resource_exhausted_and_closed_streams_abort_in_vllm(cluster, prompts):
    """workers.max_queue 2: two streams in flight, the third is refused; closing the
    two (a client gone) aborts them inside vLLM, whose queue empties."""
    decode = cluster.cluster.pools.decode[0]
    client = _http(cluster)
    streams = [client.completions.create(model="smollm2", prompt=prompts["short"],
                                         max_tokens=400, temperature=0, stream=True)
               for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # admitted and decoding
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="smollm2", prompt=prompts["short"], max_tokens=4)
    assert ray.get(decode.actor.stats.remote(), timeout=30)["engine_requests"] == 2
    load = ray.get(decode.actor.poll.remote(False), timeout=30)[0]
    assert load.active_decode_requests == 2 and 0 < load.kv_usage < 1  # vLLM's own figure
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 20
    while ray.get(decode.actor.stats.remote(), timeout=30)["engine_requests"]:
        assert time.monotonic() < deadline, "vLLM still runs the closed requests"
        time.sleep(0.1)
    assert _generate(KVClusterClient(cluster.address), prompts["short"]).token_ids  # serves on
