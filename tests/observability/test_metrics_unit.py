"""The metric families and the endpoint on their own (no cluster)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from kvcluster.common.requests import FinalEvent
from kvcluster.observability.log_tail import RecentLogs, RequestIdFilter
from kvcluster.observability.logs import JsonFormatter, request_context
from kvcluster.observability.metrics import (
    FrontendMetrics,
    MetricsEndpoint,
    RouterMetrics,
    TransferMetrics,
    WorkerMetrics,
)
from router.decision import RouteDecision
from tests.observability.conftest import scrape, value


def test_endpoint_serves_the_union_of_registries():
    frontend, router = FrontendMetrics(), RouterMetrics()
    other = CollectorRegistry()
    Counter("other_things", "x", registry=other).inc(3)
    endpoint = MetricsEndpoint([frontend.registry, router.registry, other])
    address = endpoint.start("127.0.0.1", 0)
    try:
        assert not address.endswith(":0")
        frontend.requests.labels("OK").inc(2)
        router.observe_decision("decode", RouteDecision(["d-0"], 4, 64, "hit", "kv_aware",
                                                        {"d-1": "silent"}))
        samples = scrape(address)
    finally:
        endpoint.stop()
    assert value(samples, "kvcluster_frontend_requests_total", code="OK") == 2
    assert value(samples, "kvcluster_router_decisions_total",
                 pool="decode", policy="kv_aware") == 1
    assert value(samples, "kvcluster_router_matched_tokens_sum", pool="decode") == 64
    assert value(samples, "kvcluster_router_excluded_instances", pool="decode") == 1
    assert value(samples, "other_things_total") == 3


def test_router_view_states_are_read_per_pool_at_scrape_time():
    from kvcluster.common.config import RouterConfig
    from kvcluster.common.events import HashSettings
    from router import KVEventPublisher, Router

    router, metrics = Router(RouterConfig(), HashSettings("m", 16, 64)), RouterMetrics()
    metrics.watch_views("decode", router.view_counts)
    KVEventPublisher("w", HashSettings("m", 16, 256), router.bus).announce()
    get = lambda state: metrics.registry.get_sample_value(  # noqa: E731
        "kvcluster_router_instance_views", {"pool": "decode", "state": state})
    assert get("hash_mismatch") == 0
    router.pump_events()
    assert get("hash_mismatch") == 1 and get("ok") == 0


def test_two_components_of_one_kind_do_not_clash():
    a, b = WorkerMetrics("p-0", "prefill"), WorkerMetrics("p-1", "prefill")
    a.count("ok")
    assert a.registry.get_sample_value("kvcluster_worker_requests_total",
                                       {"role": "prefill", "outcome": "ok"}) == 1
    assert b.registry.get_sample_value("kvcluster_worker_requests_total",
                                       {"role": "prefill", "outcome": "ok"}) is None


def test_stream_timings():
    metrics = FrontendMetrics()
    metrics.observe_stream(10.0, [10.5, 10.7, 10.9])  # TTFT 0.5 s, 0.2 s per later token
    metrics.observe_stream(20.0, [])                   # no token: no TTFT sample
    assert metrics.registry.get_sample_value("kvcluster_frontend_ttft_seconds_count") == 1
    assert metrics.registry.get_sample_value("kvcluster_frontend_ttft_seconds_sum") == \
        pytest.approx(0.5)
    assert metrics.registry.get_sample_value(
        "kvcluster_frontend_time_per_output_token_seconds_sum") == pytest.approx(0.2)


def test_final_events_feed_stage_histograms_and_cached_tokens_by_source():
    metrics = FrontendMetrics()
    final = FinalEvent("stop", 120.0, stage_ms={"route": 2.0, "first_decode_step": 100.0},
                       cached_tokens_by_tier={"prefix_cache": 480, "host": 32})
    metrics.observe_stream(0.0, [0.12], final)
    get = metrics.registry.get_sample_value
    assert get("kvcluster_frontend_stage_seconds_sum", {"stage": "route"}) == pytest.approx(0.002)
    assert get("kvcluster_frontend_stage_seconds_count", {"stage": "first_decode_step"}) == 1
    assert get("kvcluster_frontend_cached_prompt_tokens_total", {"source": "host"}) == 32
    assert get("kvcluster_frontend_cached_prompt_tokens_total",
               {"source": "prefix_cache"}) == 480


def test_transfer_counts_chunks_and_bytes_by_level():
    metrics = TransferMetrics()
    metrics.observe_send(True, 0.25, [("int8", 100), ("int8", 50), ("lossless", 400), ("", 0)])
    metrics.observe_send(False, 9.0, [("int8", 10)])
    get = metrics.registry.get_sample_value
    assert get("kvcluster_transfer_chunks_total", {"level": "int8"}) == 3
    assert get("kvcluster_transfer_bytes_total", {"level": "int8"}) == 160
    assert get("kvcluster_transfer_bytes_total", {"level": "lossless"}) == 400
    assert get("kvcluster_transfer_requests_total", {"outcome": "failed"}) == 1
    assert get("kvcluster_transfer_seconds_count") == 1  # failed streams have no duration


def test_worker_queue_gauges_read_at_scrape_time():
    depth = {"tokens": 0}
    metrics = WorkerMetrics("p-0", "prefill")
    metrics.watch_queue(lambda: depth["tokens"], lambda: 0)
    depth["tokens"] = 123
    assert metrics.registry.get_sample_value("kvcluster_worker_queued_prefill_tokens") == 123
    assert metrics.registry.get_sample_value(
        "kvcluster_worker_info", {"instance_id": "p-0", "role": "prefill"}) == 1


def test_log_records_are_stamped_with_the_request_id_when_emitted():
    logger = logging.getLogger("tests.observability.stamp")
    tail = RecentLogs()
    logger.addHandler(tail)
    logger.setLevel(logging.INFO)
    try:
        with request_context("req-abc"):
            logger.info("inside")
        logger.info("outside")
    finally:
        logger.removeHandler(tail)
    assert [(e["msg"], e["request_id"]) for e in tail.entries] == \
        [("inside", "req-abc"), ("outside", "")]
    assert tail.request_ids() == ["req-abc"]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    with request_context("req-xyz"):
        RequestIdFilter().filter(record)
    assert '"request_id": "req-xyz"' in JsonFormatter().format(record)
