"""The whole system on a real local Ray cluster: front end, routers, actors, gRPC.

One cluster per module (Ray start-up costs seconds); tests run in order and
the later ones kill actors.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
import pytest

from kvcluster.client import KVClusterClient, TokenEvent
from kvcluster.client.sync_client import GenerateError
from kvcluster.common.sampling import SamplingParams
from kvcluster.common.tasks import DecodeTask, PrefillTask
from kvcluster.engine.llm_engine import LLMEngine
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.runtime.launcher import ClusterThread
from kvcluster.worker.node import build_runner
from tests.workers.conftest import tiny_config

ray = pytest.importorskip("ray")

DOC = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 byte tokens


@pytest.fixture(scope="module")
def cluster(tiny_model):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = tiny_config(tiny_model, workers={"num_prefill": 1, "num_decode": 2},
                         router={"heartbeat_ttl_s": 4.0, "port": 0, "silent_window_s": 30.0})
    handle = ClusterThread(config, num_cpus=2, start_timeout_s=240)
    yield handle
    handle.close()
    ray.shutdown()


def _expected(config_model, prompt_ids, max_new_tokens):
    runner = build_runner(tiny_config(config_model))
    engine = LLMEngine(runner)
    return engine.generate([list(prompt_ids)], SamplingParams(max_new_tokens=max_new_tokens))[0]


def test_request_goes_through_prefill_and_decode_pools(cluster, tiny_model):
    params = SamplingParams(max_new_tokens=6)
    with KVClusterClient(cluster.address) as client:
        first = client.generate(DOC + "Question one?", params=params, timeout_s=60)
        second = client.generate(DOC + "Question two?", params=params, timeout_s=60)
    assert first.final.prefill_instance == "prefill-0"
    assert first.final.decode_instance.startswith("decode-")
    assert len(first.token_ids) == first.final.num_output_tokens > 0
    prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(DOC + "Question one?")
    assert list(first.token_ids) == _expected(tiny_model, prompt_ids, 6)[:len(first.token_ids)]
    # The shared document's whole chunks came from a cache the second time: the
    # first request's events reached the decode router before the second was
    # routed (relayed right after each request), so it went where they are.
    assert second.final.num_cached_tokens >= 128
    assert second.final.decode_instance == first.final.decode_instance
    assert second.final.prefill_instance == ""  # no transfer needed


def test_short_uncached_tails_are_prefilled_on_the_decode_instance(cluster, tiny_model):
    """Conditional disaggregation: a prompt whose decode instance lacks at most
    ``workers.max_local_prefill_tokens`` of its whole chunks is computed there (no
    prefill hop, no transfer); with the bound at 0 the same shape goes to the pool."""
    workers = cluster.cluster.backend.config.workers
    params = SamplingParams(max_new_tokens=4)
    doc = "Conditional disaggregation keeps short tails local. " * 3  # ~156 byte tokens
    saved = workers.max_local_prefill_tokens
    try:
        with KVClusterClient(cluster.address) as client:
            workers.max_local_prefill_tokens = 64
            first = client.generate(doc + "Q?", params=params, timeout_s=60)
            assert first.final.prefill_instance == "prefill-0"  # ~9 whole chunks uncached
            # 40 more tokens: 2-3 new whole chunks on the instance holding the rest
            second = client.generate(doc + "x" * 40 + "Q?", params=params, timeout_s=60)
            assert second.final.prefill_instance == ""
            assert second.final.decode_instance == first.final.decode_instance
            assert second.final.num_cached_tokens >= 144
            prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(doc + "x" * 40 + "Q?")
            assert list(second.token_ids) == _expected(tiny_model, prompt_ids, 4)
            workers.max_local_prefill_tokens = 0
            third = client.generate(doc + "y" * 40 + "Q?", params=params, timeout_s=60)
            assert third.final.prefill_instance == "prefill-0"
            assert third.final.stage_ms["kv_transfer"] > 0
            assert {"route", "first_decode_step", "token_relay"} <= set(third.final.stage_ms)
    finally:
        workers.max_local_prefill_tokens = saved


def test_decode_receivers_refuse_senders_without_the_cluster_secret(cluster):
    """No security configured (the embedded default): the launcher still gives the
    workers a generated internal secret, so the KV stream is not open to anyone who
    can reach the port (the first test's transfer shows the workers have it)."""
    from kvcluster.transfer.server import INFO_METHOD

    for handle in cluster.cluster.pools.decode:
        with grpc.insecure_channel(handle.address) as channel:
            info = channel.unary_unary(INFO_METHOD)
            for metadata in ((), (("authorization", "Bearer guess"),)):
                with pytest.raises(grpc.RpcError) as err:
                    info(b"", metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_full_decode_queues_answer_resource_exhausted(cluster):
    """Every decode actor at ``workers.max_queue``: the actor's OverloadedError
    reaches the client as RESOURCE_EXHAUSTED through Ray, not as INTERNAL."""
    pools = cluster.cluster.pools
    held = _hold_decode_slots(pools.decode, cluster.cluster.config.workers.max_queue)
    try:
        with KVClusterClient(cluster.address) as client, pytest.raises(GenerateError) as info:
            client.generate("Overloaded? " + DOC, params=SamplingParams(max_new_tokens=3),
                            timeout_s=60)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
        assert "active requests" in info.value.details
    finally:
        _release_decode_slots(held)


def test_prompt_too_long_for_the_workers_engine_is_invalid_argument(cluster):
    """Within the front end's limits but over the engine's ``max_model_len``: the
    decode worker's InvalidRequestError keeps its code across Ray."""
    max_model_len = cluster.cluster.config.engine.max_model_len
    prompt = "Too long. " + DOC * 4
    with KVClusterClient(cluster.address) as client, pytest.raises(GenerateError) as info:
        client.generate(prompt, params=SamplingParams(max_new_tokens=3), timeout_s=60)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert f"max_model_len={max_model_len}" in info.value.details


def test_full_prefill_queue_leaves_the_prompt_to_the_decoder(cluster, tiny_model):
    """The prefill actor at ``workers.max_queue`` answers OverloadedError at once;
    the request is still served, the decode worker computing the prompt."""
    pools = cluster.cluster.pools
    max_queue = cluster.cluster.config.workers.max_queue
    with _stalling_receiver() as (stall_address, release):
        refs = [pools.prefill[0].actor.prefill.remote(PrefillTask(
            f"hold-p{i}", tuple(range(1, 40)), "", stall_address)) for i in range(max_queue)]
        _wait_for(lambda: _load(pools.prefill[0]).queued_prefill_tokens >= max_queue * 39)
        prompt = "Prefill is full. " + DOC
        with KVClusterClient(cluster.address) as client:
            result = client.generate(prompt, params=SamplingParams(max_new_tokens=4),
                                     timeout_s=60)
        release()
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=60)
        assert len(done) == len(refs)  # the held tasks end (their receiver went away)
    assert result.final.prefill_instance == ""
    assert result.final.num_output_tokens == 4
    prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(prompt)
    assert list(result.token_ids) == _expected(tiny_model, prompt_ids, 4)
    overloaded = ray.get(pools.prefill[0].actor.__ray_call__.remote(
        lambda actor: actor.worker.metrics.value("kvcluster_worker_requests_total",
                                                 role="prefill", outcome="overloaded")))
    assert overloaded >= 1  # the request did reach the full prefill worker


def test_decode_actor_killed_mid_generation_resumes(cluster, tiny_model):
    prompt = DOC + "Tell me a long story."
    params = SamplingParams(max_new_tokens=120)
    tokens, killed = [], []
    with KVClusterClient(cluster.address) as client:
        for event in client.generate_stream(prompt, params=params, timeout_s=120):
            if isinstance(event, TokenEvent):
                tokens.extend(event.token_ids)
                if len(tokens) >= 5 and not killed:
                    victim = _busy_decode_actor(cluster)
                    ray.kill(victim.actor, no_restart=False)
                    killed += [victim.instance_id, victim.address]
            else:
                final = event
    assert killed, "never got far enough to kill an actor"
    assert final.num_output_tokens == len(tokens)
    prompt_ids = Tokenizer.from_pretrained(tiny_model).encode(prompt)
    expected = _expected(tiny_model, prompt_ids, 120)
    assert tokens == expected[:len(tokens)]
    assert cluster.cluster.backend.stats["decode_retries"] >= 1
    # Ray restarts the victim; its receiver comes back on a new port and rejoins.
    handle = cluster.cluster.pools.by_id(killed[0])
    old_address, deadline = killed[1], time.time() + 60
    registry = cluster.cluster.backend.routers["decode"].registry
    while time.time() < deadline and not (
            handle.address != old_address
            and any(i.instance_id == handle.instance_id for i in registry.alive())):
        time.sleep(0.5)
    assert handle.address != old_address
    assert any(i.instance_id == handle.instance_id for i in registry.alive())


def test_killed_prefill_actor_restarts_and_serves_again(cluster):
    handle = cluster.cluster.pools.prefill[0]
    router = cluster.cluster.backend.routers["prefill"]
    ray.kill(handle.actor, no_restart=False)
    served_by, deadline = [], time.time() + 90
    with KVClusterClient(cluster.address) as client:
        while time.time() < deadline:
            # A fresh prefix each time: no decode store holds it, so P is needed.
            result = client.generate(f"Request {len(served_by)}. " + DOC,
                                     params=SamplingParams(max_new_tokens=3), timeout_s=60)
            served_by.append(result.final.prefill_instance)
            assert result.final.num_output_tokens == 3  # served even while P was down
            if served_by[-1] == "prefill-0":
                break
            time.sleep(0.5)
    assert served_by[0] == "", "the killed prefill actor cannot have served"
    assert served_by[-1] == "prefill-0", f"never came back: {served_by}"
    assert any(i.instance_id == "prefill-0" for i in router.registry.alive())


def _busy_decode_actor(cluster):
    """The decode actor that has an active request right now."""
    pools = cluster.cluster.pools
    for handle in pools.decode:
        load, _, _ = ray.get(handle.actor.poll.remote(False), timeout=10)
        if load.active_decode_requests:
            return handle
    return pools.decode[0]


def _load(handle):
    load, _, _ = ray.get(handle.actor.poll.remote(False), timeout=10)
    return load


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _hold_decode_slots(handles, max_queue: int) -> list:
    """Fill every decode actor's queue with tasks that wait for KV no one sends
    (no compute); returns (handle, request id, stream) per task."""
    held = []
    for handle in handles:
        for i in range(max_queue):
            request_id = f"hold-{handle.instance_id}-{i}"
            task = DecodeTask(request_id, (1, 2, 3, 4, 5), SamplingParams(max_new_tokens=1),
                              expect_kv=True, kv_timeout_s=60.0)
            held.append((handle, request_id,
                         handle.actor.generate.options(num_returns="streaming").remote(task)))
    for handle in handles:
        _wait_for(lambda h=handle: _load(h).active_decode_requests >= max_queue)
    return held


def _release_decode_slots(held: list) -> None:
    """Tell each held task its KV is not coming: it computes its one token and ends."""
    ray.get([handle.actor.abandon_kv.remote(request_id) for handle, request_id, _ in held],
            timeout=30)
    for _, _, stream in held:
        for ref in stream:
            ray.get(ref, timeout=60)


class _stalling_receiver:
    """A gRPC server on 127.0.0.1 whose KV-transfer methods hang until released
    (then answer UNAVAILABLE): senders to it hold their prefill slot meanwhile."""

    def __enter__(self):
        from kvcluster.transfer.server import SERVICE

        self._released = threading.Event()

        def stall(request, context):
            self._released.wait(60)
            context.abort(grpc.StatusCode.UNAVAILABLE, "stalling receiver released")

        handlers = {"GetReceiverInfo": grpc.unary_unary_rpc_method_handler(stall),
                    "StreamKV": grpc.stream_stream_rpc_method_handler(stall)}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return f"127.0.0.1:{port}", self._released.set

    def __exit__(self, *exc):
        self._released.set()
        self._server.stop(0)
