"""Metrics, request-id logs, status and a bounded load run on one real local cluster."""

from __future__ import annotations

import logging
import time

import pytest

from kvcluster.client import KVClusterClient
from kvcluster.common.sampling import SamplingParams
from kvcluster.observability.log_tail import RequestIdFilter
from tests.observability.conftest import by_label, ray, scrape, value

DOC = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 byte tokens: 8 chunks of 16


def _generate(cluster, prompts, request_ids=None):
    with KVClusterClient(cluster.address) as client:
        return [client.generate(p, params=SamplingParams(max_new_tokens=4), timeout_s=60,
                                request_id=(request_ids[i] if request_ids else ""))
                for i, p in enumerate(prompts)]


def _worker(cluster, role):
    handle = getattr(cluster.cluster.pools, role)[0]
    return handle.actor, ray.get(handle.actor.info.remote(), timeout=30)


def test_frontend_metrics_count_every_request(cluster):
    address = cluster.cluster.metrics_address
    before = scrape(address)
    results = _generate(cluster, [DOC + "Question 0?"])
    time.sleep(1.5)  # the routers learn of the stored chunks from the next heartbeats
    results += _generate(cluster, [DOC + f"Question {i}?" for i in (1, 2)])
    after = scrape(address)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert all(r.final.num_output_tokens == 4 for r in results)
    assert delta("kvcluster_frontend_ttft_seconds_count") == 3
    assert delta("kvcluster_frontend_time_per_output_token_seconds_count") == 3
    assert delta("kvcluster_frontend_requests_total", code="OK") == 3
    assert delta("kvcluster_frontend_output_tokens_total") == 12
    assert value(after, "kvcluster_frontend_in_flight_requests") == 0
    assert delta("kvcluster_router_decisions_total", pool="decode", policy="kv_aware") == 3
    assert value(after, "kvcluster_router_live_instances", pool="decode") == 1
    assert value(after, "kvcluster_router_instance_views", pool="decode", state="ok") == 1
    assert value(after, "kvcluster_router_instance_views", pool="prefill",
                 state="hash_mismatch") == 0
    # The 2nd and 3rd request share the document's 8 chunks: the routers saw the overlap.
    assert delta("kvcluster_router_matched_tokens_sum", pool="decode") + \
        delta("kvcluster_router_matched_tokens_sum", pool="prefill") >= 2 * 128


def test_bad_requests_are_counted_by_status_code(cluster):
    before = scrape(cluster.cluster.metrics_address)
    with KVClusterClient(cluster.address) as client, pytest.raises(Exception):
        client.generate("x", params=SamplingParams(max_new_tokens=10**6), timeout_s=30)
    after = scrape(cluster.cluster.metrics_address)
    assert value(after, "kvcluster_frontend_requests_total", code="INVALID_ARGUMENT") == \
        value(before, "kvcluster_frontend_requests_total", code="INVALID_ARGUMENT") + 1


def test_worker_metrics_show_tiers_transfer_and_latency(cluster):
    _generate(cluster, [DOC + "Worker question A?", DOC + "Worker question B?"])
    prefill, info = _worker(cluster, "prefill")
    samples = scrape(info["metrics_address"])
    assert value(samples, "kvcluster_worker_info", instance_id="prefill-0", role="prefill") == 1
    assert value(samples, "kvcluster_worker_prefill_seconds_count") >= 2
    sent = by_label(samples, "kvcluster_transfer_bytes_total", "level")
    assert sent and all(v > 0 for v in sent.values()), sent
    chunks = by_label(samples, "kvcluster_transfer_chunks_total", "level")
    assert set(chunks) == set(sent) and sum(chunks.values()) >= 2
    hits = by_label(samples, "kvstore_hits_total", "tier")
    assert sum(hits.values()) > 0, hits  # question B found the document's chunks
    assert value(samples, "kvcluster_worker_queued_prefill_tokens") == 0

    _, dinfo = _worker(cluster, "decode")
    assert dinfo["metrics_address"] != info["metrics_address"]
    dsamples = scrape(dinfo["metrics_address"])
    assert value(dsamples, "kvcluster_worker_decode_seconds_count") >= 2
    assert value(dsamples, "kvcluster_worker_requests_total", role="decode", outcome="ok") >= 2
    assert value(dsamples, "kvcluster_worker_active_decode_requests") == 0


def test_one_request_id_in_frontend_and_worker_logs(cluster, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="kvcluster.frontend")
    _generate(cluster, [DOC + "Trace me?"], request_ids=["obs-trace-1"])
    mine = [r for r in caplog.records if r.name == "kvcluster.frontend"
            and getattr(r, "request_id", "") == "obs-trace-1"]
    assert any(r.getMessage().startswith("generate ") for r in mine)
    assert any(r.getMessage().startswith("done ") for r in mine)
    for role, line in (("prefill", "prefill done"), ("decode", "decode done")):
        actor, _ = _worker(cluster, role)
        logs = ray.get(actor.recent_logs.remote(), timeout=30)
        assert any(e["request_id"] == "obs-trace-1" and e["msg"].startswith(line)
                   for e in logs), (role, logs[-5:])


def test_status_hit_rates_and_frontend_endpoint(cluster):
    from kvcluster.runtime.status import _frontend_line, hit_rates

    _generate(cluster, [DOC + "Status A?", DOC + "Status B?"])
    prefill, _ = _worker(cluster, "prefill")
    stats = ray.get(prefill.stats.remote(), timeout=30)
    rates = hit_rates(stats)
    assert set(rates) == set(stats["tiers"])
    assert 0 < sum(rates.values()) <= 1
    assert stats["lookup_chunks"] >= 16 and stats["metrics_address"] and stats["pid"] > 0
    assert cluster.cluster.metrics_address in _frontend_line()


def test_bounded_load_loses_nothing(cluster):
    from bench.load import run_load

    before = cluster.cluster.frontend_metrics.registry.get_sample_value(
        "kvcluster_frontend_ttft_seconds_count")
    report = run_load(cluster, num_clients=4, seconds=5.0, deadline_s=30.0, max_new_tokens=6)
    assert report["requests"] >= 20
    assert (report["lost"], report["hung"]) == (0, 0), report["errors"]
    assert report["ok"] == report["requests"]
    assert report["metrics_ttft_count"] - before == report["ok"]
    assert set(report["rss_after_mb"]) == {"frontend", "prefill-0", "decode-0"}
    assert all(v > 0 for v in report["rss_after_mb"].values())


@pytest.mark.slow
def test_soak_ten_minutes(cluster):
    from bench.load import run_load

    report = run_load(cluster, num_clients=8, seconds=600.0, deadline_s=60.0)
    assert (report["lost"], report["hung"]) == (0, 0), report["errors"]
    assert report["rss_growth_mb"] < 256, report["rss_samples_mb"][-3:]
