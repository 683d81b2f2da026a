"""Prometheus metric families of the serving path, in one place, and the /metrics endpoint.

Registries: every component builds its families into its **own**
``CollectorRegistry`` (never the global default), like ``kvstore.metrics``.
Several front ends, routers or workers can then live in one process (tests,
the colocated demo) without duplicate-name errors or shared counts. Each
process serves the union of its components' registries on one HTTP
``/metrics`` endpoint (:class:`MetricsEndpoint`):

    front-end process   FrontendMetrics + RouterMetrics      router.host:router.metrics_port
    each worker actor   WorkerMetrics + TransferMetrics      transfer.host:<free port>,
                        + the kvstore's StoreMetrics          reported by info()/stats()

Names (units in the name, counters end in ``_total`` on the wire):

    kvcluster_frontend_ttft_seconds                 request admitted -> first token sent
    kvcluster_frontend_time_per_output_token_seconds  (last - first token) / (tokens - 1), per request
    kvcluster_frontend_requests_total{code}          finished calls by gRPC status code name
    kvcluster_frontend_in_flight_requests           calls being served now
    kvcluster_frontend_output_tokens_total          tokens streamed to clients
    kvcluster_router_decisions_total{pool,policy}    routing decisions (policy "fallback" included)
    kvcluster_router_matched_tokens{pool}            prefix tokens the chosen instance holds
    kvcluster_router_excluded_instances{pool}        live instances left out of the last decision
    kvcluster_router_live_instances{pool}            instances with a fresh heartbeat
    kvcluster_router_instance_views{pool,state}      instances per KV-view state (ok, pending,
                                                     silent, resyncing, hash_mismatch: refused)
    kvcluster_decode_retries_total                   decode attempts resumed on another instance
    kvcluster_worker_info{instance_id,role}          always 1 (names the process)
    kvcluster_worker_queued_prefill_tokens           prompt tokens waiting for or in prefill
    kvcluster_worker_active_decode_requests          requests in the decode batch
    kvcluster_worker_prefill_seconds                 one task's prefill compute (load + compute + store)
    kvcluster_worker_decode_seconds                  one task's decode, arrival -> final token
    kvcluster_worker_decode_first_token_seconds      one task's arrival -> first token
    kvcluster_worker_requests_total{role,outcome}    tasks by outcome (ok, error, overloaded)
    kvcluster_worker_prefix_lookup_chunks_total      prompt chunks looked up in the kvstore
                                                     (hit rate of a tier = kvstore_hits_total / this)
    kvcluster_transfer_bytes_total{level}            encoded KV payload bytes sent, by codec level
    kvcluster_transfer_chunks_total{level}           chunks sent, by the codec level chosen
    kvcluster_transfer_seconds                       one request's KV stream, send -> final status
    kvcluster_transfer_requests_total{outcome}       streams by outcome (ok, failed)
    kvstore_*                                        see kvstore/metrics.py
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

__all__ = ["FrontendMetrics", "RouterMetrics", "WorkerMetrics", "TransferMetrics",
           "MetricsEndpoint", "advertised", "sample_value"]


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.ttft = Histogram("kvcluster_frontend_ttft_seconds",
                              "Request admitted to first token sent", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("kvcluster_frontend_time_per_output_token_seconds",
                              "Mean time between output tokens of one request",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kvcluster_frontend_requests", "Finished calls by status code",
                                ["code"], registry=r)
        self.in_flight = Gauge("kvcluster_frontend_in_flight_requests", "Calls being served",
                               registry=r)
        self.output_tokens = Counter("kvcluster_frontend_output_tokens",
                                     "Tokens streamed to clients", registry=r)
        self.stage = Histogram("kvcluster_frontend_stage_seconds",
                               "Where requests' time went, by serving stage "
                               "(kvcluster.common.requests.STAGES)", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.cached_tokens = Counter("kvcluster_frontend_cached_prompt_tokens",
                                     "Prompt tokens whose KV came from a cache, by source "
                                     "(transfer, prefix_cache, a kvstore tier)", ["source"],
                                     registry=r)

    def observe_stream(self, began_s: float, token_times_s: list[float], final=None) -> None:
        """One finished stream: ``token_times_s`` are perf_counter stamps of its tokens;
        ``final`` (its FinalEvent) adds its stage timings and cached tokens by source."""
        if final is not None:
            for stage, ms in final.stage_ms.items():
                self.stage.labels(stage).observe(ms / 1e3)
            for source, num_tokens in final.cached_tokens_by_tier.items():
                self.cached_tokens.labels(source).inc(num_tokens)
        if not token_times_s:
            return
        self.ttft.observe(token_times_s[0] - began_s)
        if len(token_times_s) > 1:
            span = token_times_s[-1] - token_times_s[0]
            self.tpot.observe(span / (len(token_times_s) - 1))


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.decisions = Counter("kvcluster_router_decisions", "Routing decisions",
                                 ["pool", "policy"], registry=r)
        self.matched_tokens = Histogram("kvcluster_router_matched_tokens",
                                        "Prefix tokens the chosen instance holds", ["pool"],
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.excluded = Gauge("kvcluster_router_excluded_instances",
                              "Live instances left out of the last decision", ["pool"],
                              registry=r)
        self.live = Gauge("kvcluster_router_live_instances", "Instances with a fresh heartbeat",
                          ["pool"], registry=r)
        self.views = Gauge("kvcluster_router_instance_views",
                           "Instances by the state of the router's view of their KV "
                           "(hash_mismatch: their event batches are refused)",
                           ["pool", "state"], registry=r)
        self.decode_retries = Counter("kvcluster_decode_retries",
                                      "Decode attempts resumed on another instance", registry=r)

    def observe_decision(self, pool: str, decision) -> None:
        """Record a ``router.decision.RouteDecision`` made for ``pool``."""
        self.decisions.labels(pool, decision.policy).inc()
        self.matched_tokens.labels(pool).observe(decision.matched_tokens)
        self.excluded.labels(pool).set(len(decision.excluded))

    def watch_live(self, pool: str, count: Callable[[], int]) -> None:
        """Read the live-instance count at scrape time."""
        self.live.labels(pool).set_function(lambda: float(count()))

    def watch_views(self, pool: str, counts: Callable[[], Mapping[str, int]]) -> None:
        """Read instances per KV-view state (``router.Router.view_counts``) at scrape time;
        the states are the keys ``counts()`` returns now."""
        for state in counts():
            self.views.labels(pool, state).set_function(lambda s=state: float(counts()[s]))


class WorkerMetrics:
    def __init__(self, instance_id: str, role: str, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        Info("kvcluster_worker", "The worker this process runs", registry=r).info(
            {"instance_id": instance_id, "role": role})
        self.role = role
        self.queued_prefill_tokens = Gauge("kvcluster_worker_queued_prefill_tokens",
                                           "Prompt tokens waiting for or in prefill",
                                           registry=r)
        self.active_decode_requests = Gauge("kvcluster_worker_active_decode_requests",
                                            "Requests in the decode batch", registry=r)
        self.prefill_seconds = Histogram("kvcluster_worker_prefill_seconds",
                                         "One task's prefill compute", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.decode_seconds = Histogram("kvcluster_worker_decode_seconds",
                                        "One task's decode, arrival to final token",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.decode_first_token = Histogram("kvcluster_worker_decode_first_token_seconds",
                                            "One task's arrival to first token",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kvcluster_worker_requests", "Tasks by outcome",
                                ["role", "outcome"], registry=r)
        self.lookup_chunks = Counter("kvcluster_worker_prefix_lookup_chunks",
                                     "Prompt chunks looked up in the kvstore", registry=r)

    def watch_queue(self, queued_prefill_tokens: Callable[[], int],
                    active_decode_requests: Callable[[], int]) -> None:
        """Read the queue depths at scrape time (nothing on the hot path)."""
        self.queued_prefill_tokens.set_function(lambda: float(queued_prefill_tokens()))
        self.active_decode_requests.set_function(lambda: float(active_decode_requests()))

    def count(self, outcome: str) -> None:
        self.requests.labels(self.role, outcome).inc()

    def value(self, name: str, **labels: str) -> float:
        return sample_value(self.registry, name, **labels)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.bytes = Counter("kvcluster_transfer_bytes", "Encoded KV payload bytes sent",
                             ["level"], registry=r)
        self.chunks = Counter("kvcluster_transfer_chunks", "Chunks sent by codec level",
                              ["level"], registry=r)
        self.seconds = Histogram("kvcluster_transfer_seconds", "One request's KV stream",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kvcluster_transfer_requests", "KV streams by outcome",
                                ["outcome"], registry=r)

    def observe_send(self, ok: bool, elapsed_s: float,
                     bytes_by_chunk: Iterable[tuple[str, int]]) -> None:
        """One finished stream; ``bytes_by_chunk`` is (level, payload bytes) per chunk."""
        self.requests.labels("ok" if ok else "failed").inc()
        if ok:
            self.seconds.observe(elapsed_s)
        for level, num_bytes in bytes_by_chunk:
            if level:
                self.chunks.labels(level).inc()
                self.bytes.labels(level).inc(num_bytes)


class MetricsEndpoint:
    """One process's ``/metrics`` over HTTP: the union of several registries."""

    def __init__(self, registries: Iterable[CollectorRegistry] = ()):
        self.registry = CollectorRegistry(auto_describe=False)
        self._server = None
        self.address = ""
        for registry in registries:
            self.add(registry)

    def add(self, registry: CollectorRegistry) -> None:
        self.registry.register(_Forward(registry))

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port). Returns ``host:port``."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.address = f"{host}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def value(self, name: str, **labels: str) -> float:
        return sample_value(self.registry, name, **labels)


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's current value (tests, status); 0 when absent."""
    found = registry.get_sample_value(name, labels or None)
    return 0.0 if found is None else found


class _Forward:
    """A collector that re-exports another registry (no describe: no name clash checks)."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        return self._registry.collect()


def advertised(address: str) -> str:
    """A wildcard bind (0.0.0.0, ::) is advertised as this Ray node's IP."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", "*", ""):
        import ray

        host = ray.util.get_node_ip_address()
    return f"{host}:{port}"


def advertised_zmq(endpoint: str) -> str:
    """A ZMQ ``tcp://`` endpoint bound on a wildcard, as other nodes reach it (this Ray
    node's IP); other endpoints (ipc, inproc, a concrete host) unchanged."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    return "tcp://" + advertised(endpoint.removeprefix("tcp://"))
