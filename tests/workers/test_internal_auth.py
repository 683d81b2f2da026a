"""The decode worker's KV receiver takes the cluster secret, never a tenant's token;
the prefill worker's sender presents it (real workers, real gRPC on 127.0.0.1, no Ray)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import DecodeTask, PrefillTask
from kvcluster.transfer.server import INFO_METHOD
from tests.workers.conftest import running_workers, tiny_config

TENANT_TOKEN = "tenant-token-aaaaaaaa"
PROMPT = tuple((11 * i + 5) % 300 + 10 for i in range(40))  # 2 whole store chunks + 8


@pytest.fixture
def workers(tiny_model):
    config = tiny_config(tiny_model, security={"tokens": {TENANT_TOKEN: "tenant-a"},
                                               "internal_token": "cluster-secret-cccccccc"})
    with running_workers(config) as running:
        yield running


def test_prefill_streams_with_the_cluster_secret(workers):
    loop, prefill, decode, address = workers

    async def request():
        steps, result = await asyncio.gather(
            _collect(decode.generate(DecodeTask("r1", PROMPT, SamplingParams(max_new_tokens=2),
                                                expect_kv=True, kv_timeout_s=20))),
            prefill.prefill(PrefillTask("r1", PROMPT, "", address)))
        return steps[-1], result

    final, result = loop.run_until_complete(request())
    assert result.transfer_ok, result.message
    assert final.kv_source == "transfer"


@pytest.mark.parametrize("metadata", [(("authorization", f"Bearer {TENANT_TOKEN}"),), ()])
def test_a_tenant_token_does_not_open_the_kv_receiver(workers, metadata):
    loop, _, _, address = workers

    async def info():  # on the workers' loop: the receiver serves there
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.unary_unary(INFO_METHOD)(b"", metadata=metadata, timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        loop.run_until_complete(info())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def _collect(stream):
    return [step async for step in stream]
