"""Start the whole system from one config: Ray pools, routers, the front ends.

    cluster = LocalCluster(config)
    address = await cluster.start()     # the Generate service's host:port
    cluster.http_address                # the OpenAI-compatible API's host:port
    ...
    await cluster.stop()

Both front ends (gRPC on ``router.port``, HTTP on ``router.http_port``) run on
this event loop over the same backend, and share their metrics and the
per-tenant rate limiter.

Embedded default (``redis_url`` empty): local Ray on 127.0.0.1, in-process
event buses fed by the actors' heartbeats. Cluster mode: the workers publish
to Redis Streams and the routers read them there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from kvcluster.common.config import ClusterConfig
from kvcluster.engine.models import resolve_model
from kvcluster.engine.tokenizer import Tokenizer
from kvcluster.observability.metrics import (
    FrontendMetrics,
    MetricsEndpoint,
    RouterMetrics,
    advertised_zmq,
)
from kvcluster.runtime import vllm_events
from kvcluster.runtime.pools import WorkerPools, init_local_ray
from kvcluster.server.cluster_backend import RayClusterBackend
from kvcluster.server.frontend import serve_frontend
from kvcluster.server.http import serve_http
from kvcluster.server.limits import TenantRateLimiter
from kvcluster.worker.node import hash_settings
from router.router import Router, build_router

log = logging.getLogger(__name__)


class LocalCluster:
    def __init__(self, config: ClusterConfig, num_cpus: int | None = None):
        self.config = config
        self.num_cpus = num_cpus
        self.pools = WorkerPools(config)
        self.backend: RayClusterBackend | None = None
        self.server = None
        self.http_server = None
        self.address = ""
        self.http_address = ""
        """The OpenAI-compatible API (host:port), once started."""
        self.frontend_metrics = FrontendMetrics()
        self.router_metrics = RouterMetrics()
        self.metrics = MetricsEndpoint([self.frontend_metrics.registry,
                                        self.router_metrics.registry])
        self.metrics_address = ""
        """The front-end process's /metrics (host:port), once started."""

    async def start(self) -> str:
        """Start everything; returns the front end's ``host:port``."""
        init_local_ray(self.num_cpus)
        if self.config.engine.kind == "vllm":
            routers, kv_events = await self._start_vllm_pools()
        else:
            await asyncio.to_thread(self.pools.start)
            info = self.pools.decode[0].info
            settings = hash_settings(info["model_id"], info["block_size"],
                                     self.config.store.chunk_tokens)
            routers, kv_events = [self._router(r, settings) for r in ("prefill", "decode")], {}
        info = self.pools.decode[0].info
        self.backend = RayClusterBackend(self.config, self.pools, info["model_id"], *routers,
                                         metrics=self.router_metrics, kv_events=kv_events)
        await self.backend.start()
        tokenizer = Tokenizer.from_pretrained(resolve_model(self.config.model.path))
        rc = self.config.router
        limiter = TenantRateLimiter.from_config(self.config.limits)
        self.server, port = await serve_frontend(self.backend, tokenizer, self.config,
                                                 host=rc.host, port=rc.port,
                                                 metrics=self.frontend_metrics,
                                                 rate_limiter=limiter)
        self.address = f"{rc.host}:{port}"
        self.http_server, http_port = await serve_http(
            self.backend, tokenizer, self.config, model_names=served_model_names(
                self.config, info["model_id"]), host=rc.host, port=rc.http_port,
            metrics=self.frontend_metrics, metrics_registry=self.metrics.registry,
            rate_limiter=limiter)
        self.http_address = f"{rc.host}:{http_port}"
        self.metrics_address = self.metrics.start(rc.host, rc.metrics_port)
        _announce_frontend(self.address, self.metrics_address, self.http_address)
        log.info("kvcluster front end on %s, HTTP API on %s, metrics on %s", self.address,
                 self.http_address, self.metrics_address)
        return self.address

    async def stop(self) -> None:
        self.metrics.stop()
        if self.http_server is not None:
            await self.http_server.stop(1)
        if self.server is not None:
            await self.server.stop(1)
        if self.backend is not None:
            await self.backend.close()
            for router in self.backend.routers.values():
                router.stop()
        self.pools.shutdown()

    async def _start_vllm_pools(self):
        """Routers and one vLLM event subscriber per pool first: every engine's publisher
        is given its pool's subscriber address when it starts (runtime.vllm_events)."""
        settings = vllm_events.configured_hash_settings(self.config)
        routers = [self._router(role, settings) for role in ("prefill", "decode")]
        roles = ["decode"] + ([] if self.config.workers.colocated else ["prefill"])
        kv_events = {}
        for role, router in zip(("prefill", "decode"), routers):
            subscriber = role in roles and vllm_events.start_subscriber(
                router.bus, settings, self.config.router, role)
            if subscriber:
                kv_events[role] = subscriber
        # engines on other nodes connect to it: a wildcard bind goes out as this node's IP
        self.pools = WorkerPools(self.config, {r: advertised_zmq(s.endpoint)
                                               for r, s in kv_events.items()})
        try:
            await asyncio.to_thread(self.pools.start)
            vllm_events.check_workers_hash_like(
                settings, [h.info for h in self.pools.decode + self.pools.prefill])
        except BaseException:
            for subscriber in kv_events.values():
                subscriber.close()
            raise
        return routers, kv_events

    def _router(self, role: str, settings) -> Router:
        """One router per pool; in cluster mode each reads its own stream prefix."""
        rc = replace(self.config.router, redis_prefix=f"{self.config.router.redis_prefix}:{role}")
        router = build_router(replace(self.config, router=rc), settings)
        self.router_metrics.watch_views(role, router.view_counts)
        router.start()
        return router


FRONTEND_KEY = b"kvcluster:frontend"
"""Ray internal-KV key (namespace kvcluster) naming the front end, for ``kvcluster status``."""


def served_model_names(config: ClusterConfig, model_id: str) -> list[str]:
    """What the HTTP API's ``model`` field may say: the configured model (``smollm2``, a
    path), then the model id used in block hashes."""
    names = [config.model.path, model_id]
    return list(dict.fromkeys(name for name in names if name))


def _announce_frontend(address: str, metrics_address: str, http_address: str = "") -> None:
    import json

    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_put(FRONTEND_KEY, json.dumps(
            {"address": address, "metrics_address": metrics_address,
             "http_address": http_address}).encode(),
            overwrite=True, namespace="kvcluster")
    except Exception:  # noqa: BLE001 - status then just lacks the front end's line
        log.warning("could not announce the front end in Ray's KV", exc_info=True)


class ClusterThread:
    """A :class:`LocalCluster` on its own event-loop thread, for synchronous callers
    (the demo, benchmarks, tests)."""

    def __init__(self, config: ClusterConfig, num_cpus: int | None = None,
                 start_timeout_s: float = 600.0):
        import threading

        # Ray starts here, not on the loop thread: its processes die with the thread
        # that started them (PR_SET_PDEATHSIG), and the loop thread ends at close().
        init_local_ray(num_cpus)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvcluster-loop",
                                        daemon=True)
        self._thread.start()
        self.cluster = LocalCluster(config, num_cpus)
        self.address = self.run(self.cluster.start(), start_timeout_s)
        self.http_address = self.cluster.http_address

    def run(self, coro, timeout_s: float = 60.0):
        """Run ``coro`` on the cluster's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.run(self.cluster.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
