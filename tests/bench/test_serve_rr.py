"""bench.serve's routing pair: round-robin over two real servers, the group's lifecycle,
the kv_routing config and the routing workload."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from bench.serve_client import RequestResult
from bench.serve_proc import ServerProcess, free_port
from bench.serve_rr import RoundRobinClient, ServerGroup, client_for
from bench.serve_runner import Workload, WorkloadRun, run_workload
from bench.serve_stats import REQUEST_COLUMNS, request_rows, same_instance_share
from bench.serve_systems import (
    ROUTING_NUM_BLOCKS,
    ROUTING_WORKLOAD,
    SYSTEMS,
    TIERED_WORKLOAD,
    kvcluster_config,
)
from bench.serve_workloads import SHAREGPT_PATH, Conversation, PromptFitter
from kvcluster.common.config import ClusterConfig, from_dict
from tests.server.http.conftest import MODEL


def _rr(servers, go):
    async def main():
        async with RoundRobinClient([s.base_url for s in servers], MODEL) as client:
            return await go(client)
    return asyncio.run(main())


def test_round_robin_alternates_servers_request_by_request(http_server, second_http_server):
    messages = [{"role": "user", "content": "Round robin keeps no affinity at all. " * 3}]

    async def go(client):
        return [await client.chat(messages, 2, 0, turn) for turn in range(4)]

    results = _rr([http_server, second_http_server], go)
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.instance for r in results] == ["server-0", "server-1", "server-0", "server-1"]
    # The same prompt twice in a row, but each server sees it first on its first turn:
    # only the third and fourth requests find it in their server's cache.
    assert [r.num_cached_tokens > 0 for r in results] == [False, False, True, True]


def test_round_robin_interleaves_an_odd_number_of_chats_onto_alternate_servers(
        http_server, second_http_server, tokenizer):
    fitter = PromptFitter(tokenizer, 512)
    shares = []
    for n in (3, 2):
        chats = tuple(Conversation(f"rr{n}-{i}", None,
                                   tuple(f"Chat {n}.{i}, question {t}?" for t in range(3)),
                                   (3,) * 3) for i in range(n))
        workload = Workload(f"rr{n}", chats, "interleaved")
        run = _rr([http_server, second_http_server],
                  lambda client, w=workload: run_workload(client, w, fitter))
        assert all(r.ok for r in run.results)
        shares.append(same_instance_share(run.results))
    # odd: every turn lands on the other server; even: each chat stays put by accident
    assert shares == [0.0, 1.0]


def test_round_robin_needs_a_server():
    with pytest.raises(ValueError, match="at least one"):
        RoundRobinClient([], MODEL)


def test_same_instance_share_counts_later_turns_on_the_previous_turns_instance():
    def result(conversation, turn, instance, ok=True):
        r = RequestResult(conversation, turn, ok=ok)
        r.instance = instance
        return r

    results = [result(0, 0, "a"), result(0, 1, "a"), result(0, 2, "b"),
               result(1, 0, "b"), result(1, 1, "b"), result(1, 2, "a", ok=False)]
    assert same_instance_share(results) == 0.6667  # (0,1) yes, (0,2) no, (1,1) yes
    assert same_instance_share([RequestResult(0, 0, ok=True), RequestResult(0, 1, ok=True)]) \
        is None


def test_request_rows_are_the_successful_requests_in_sending_order():
    run = WorkloadRun("x")
    for sent_s, (conversation, turn, ok) in zip((3.0, 1.0, 2.0), ((0, 1, True), (0, 0, True),
                                                                  (1, 0, False))):
        r = RequestResult(conversation, turn, ok=ok, sent_s=sent_s, ttft_ms=12.345,
                          num_prompt_tokens=40, num_cached_tokens=32 * turn)
        r.instance = f"i{turn}"
        run.results.append(r)
    assert request_rows(run) == [[0, 0, 12.35, 40, 0, "i0"], [0, 1, 12.35, 40, 32, "i1"]]
    assert len(REQUEST_COLUMNS) == 6


def test_server_group_starts_and_stops_every_member(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text(json.dumps({"data": [{"id": "m"}]}))
    servers = []
    for i in range(2):
        port = free_port()
        command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                   "--directory", str(tmp_path)]
        servers.append(ServerProcess(f"static-{i}", command, {}, tmp_path / f"{i}.log",
                                     f"http://127.0.0.1:{port}"))
    group = ServerGroup("pair", servers)
    try:
        for server in servers:
            server.wait_ready(30)
        assert group.model_names() == ["m"]
        assert isinstance(client_for(group, "m"), RoundRobinClient)
        assert group.base_urls == [s.base_url for s in servers]
    finally:
        group.stop()
    assert all(s.process.poll() is not None for s in servers)
    with pytest.raises(ValueError, match="at least one"):
        ServerGroup("none", [])


def test_kv_routing_config_is_two_colocated_vllm_instances_on_loopback():
    config = from_dict(ClusterConfig, kvcluster_config(True, "/tmp/x", 8123, "vllm",
                                                       ROUTING_NUM_BLOCKS, 2))
    assert (config.workers.colocated, config.workers.num_decode) == (True, 2)
    assert (config.engine.kind, config.engine.block_size) == ("vllm", 32)
    assert config.engine.num_blocks == ROUTING_NUM_BLOCKS
    assert config.router.policy == "kv_aware"
    assert (config.router.host, config.router.http_port) == ("127.0.0.1", 8123)
    assert config.router.vllm_events_bind.startswith("tcp://127.0.0.1:")


def test_routing_systems_run_only_the_routing_workload_and_are_not_default():
    import argparse

    from bench.serve import _flags

    by_name = {s.name: s for s in SYSTEMS}
    for name in ("kv_routing", "rr"):
        assert by_name[name].workloads == (ROUTING_WORKLOAD,)
        assert by_name[name].num_instances == 2
    parser = argparse.ArgumentParser()
    _flags(parser)
    default = parser.parse_args([]).systems.split(",")
    assert "kv_routing" not in default and "rr" not in default
    assert all(ROUTING_WORKLOAD not in s.workloads and TIERED_WORKLOAD not in s.workloads
               for s in SYSTEMS if s.name in default)


@pytest.mark.skipif(not SHAREGPT_PATH.is_file(), reason="../shared/datasets is absent")
def test_routing_workload_is_an_odd_number_of_long_chats_of_its_own(tokenizer):
    from bench import serve
    from bench.common import parse_args

    workloads, _ = serve.build_workloads(parse_args(serve.__doc__, ["--quick"],
                                                    extra=serve._flags), tokenizer)
    routing = next(w for w in workloads if w.name == ROUTING_WORKLOAD)
    assert routing.schedule == "interleaved" and len(routing.conversations) % 2 == 1
    assert all(len(c.user_turns) == serve.ROUTING_TURNS for c in routing.conversations)
    others = {c.name for w in workloads if w is not routing for c in w.conversations}
    assert not others & {c.name for c in routing.conversations}


@pytest.mark.skipif(not SHAREGPT_PATH.is_file(), reason="../shared/datasets is absent")
def test_tiered_workload_is_long_chats_no_other_workload_has(tokenizer):
    from bench import serve
    from bench.common import parse_args

    workloads, _ = serve.build_workloads(parse_args(serve.__doc__, ["--quick"],
                                                    extra=serve._flags), tokenizer)
    tiered = next(w for w in workloads if w.name == TIERED_WORKLOAD)
    assert tiered.schedule == "interleaved" and len(tiered.conversations) == 8
    assert all(len(c.user_turns) == serve.TIERED_TURNS for c in tiered.conversations)
    others = {c.name for w in workloads if w is not tiered for c in w.conversations}
    assert not others & {c.name for c in tiered.conversations}


def test_each_round_robin_server_gets_its_own_core():
    import os
    from pathlib import Path

    from bench.serve_systems import one_core_each
    from bench.serve_vllm import VLLMSettings, server_env

    base = VLLMSettings(Path("/m"), "smollm2", 2048, block_size=32, num_blocks=256)
    cores = sorted(os.sched_getaffinity(0))
    bound = one_core_each(base, 2)
    assert [s.cpu_bind for s in bound] == [str(cores[i % len(cores)]) for i in range(2)]
    assert all(s.num_blocks == 256 and s.block_size == 32 for s in bound)
    assert server_env(bound[1])["VLLM_CPU_OMP_THREADS_BIND"] == bound[1].cpu_bind
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server_env(base) or \
        os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # unset: vLLM's own "auto"
