"""The router: registry + event-built index + a policy -> a decision.

It only decides (instance ids, matched prefix, reason); it never moves KV.
Instances are scored on their prefix hits only while their KV view is
trusted (:class:`ViewState.OK`). Live instances in any other state are left
out and named in ``RouteDecision.excluded``; when *no* live instance has a
trusted view, the router falls back to the least-loaded live instance and
says so in the decision's reason (``policy == "fallback"``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from kvcluster.common.config import ClusterConfig, RouterConfig
from kvcluster.common.events import HashSettings
from kvcluster.common.hashing import ExtraKeys
from router.decision import Candidates, RouteDecision, RouteRequest
from router.event_bus import EventBus, make_event_bus
from router.index import KVIndex
from router.ingestor import EventIngestor
from router.kv_view import InstanceView, ViewState
from router.load import InstanceInfo
from router.policies import RoutingPolicy, make_policy
from router.registry import InMemoryRegistry, InstanceRegistry

log = logging.getLogger("router")


class NoInstanceError(RuntimeError):
    """No live instance (every heartbeat is older than the TTL)."""


class Router:
    def __init__(self, config: RouterConfig, settings: HashSettings,
                 bus: EventBus | None = None, registry: InstanceRegistry | None = None,
                 policy: RoutingPolicy | None = None, clock: Callable[[], float] = time.time,
                 max_instances: int = 256):
        """
        Args:
            settings: what the workers announce; ``settings.tokens_per_hash`` is what
                one indexed hash stands for (a batch announcing other settings is refused).

        Raises:
            ValueError: ``settings.tokens_per_hash`` is 0.
        """
        if settings.tokens_per_hash <= 0:
            raise ValueError(f"the router needs settings.tokens_per_hash > 0 (the tokens one "
                             f"announced hash stands for), got {settings}")
        self.config = config
        self.settings = settings
        self.clock = clock
        self.bus = bus or make_event_bus()
        self.registry = registry or InMemoryRegistry(config.heartbeat_ttl_s, clock)
        self.policy = policy or make_policy(config)
        self.tokens_per_hash = settings.tokens_per_hash
        """Tokens one indexed hash stands for (matched_tokens = matched_blocks * this)."""
        self.index = KVIndex(max_instances)
        self.ingestor = EventIngestor(self.index, settings, self.bus,
                                      config.resync_timeout_s, clock)
        self._cache: tuple | None = None  # (alive list, view version, Candidates, excluded, mask)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public API

    def route(self, request: RouteRequest) -> RouteDecision:
        """Pick an instance for ``request``; raises NoInstanceError when none is alive."""
        candidates, excluded, mask = self._candidates()
        if not len(candidates):
            return self._fallback(excluded)
        with self.ingestor.lock:
            match = self.index.match(request.block_hashes, mask)
        decision = self.policy.choose(request, candidates.with_match(match))
        decision.excluded = excluded
        return decision

    def request_for(self, token_ids: Sequence[int], extra: ExtraKeys,
                    request_id: str = "") -> RouteRequest:
        """A RouteRequest hashed exactly as the workers announce their KV."""
        return RouteRequest.from_tokens(token_ids, self.settings, extra, request_id)

    def pump_events(self, max_batches: int = 1024, timeout_s: float = 0.0) -> int:
        """Apply one round of event batches from the bus. Returns batches read."""
        return self.ingestor.pump(max_batches, timeout_s)

    def tick(self) -> None:
        """Housekeeping: flag silent instances, repeat overdue resync requests."""
        registered = {i.instance_id: i.registered_at for i in self.registry.alive()}
        self.ingestor.check(registered, self.config.silent_window_s)

    def status(self) -> dict[str, InstanceView]:
        """Every known instance's KV-view state and reason (runs :meth:`tick` first)."""
        self.tick()
        return dict(self.ingestor.views)

    def view_counts(self) -> dict[str, int]:
        """Instances per KV-view state (every state, zeros included), for a metric."""
        counts = {state.value: 0 for state in ViewState}
        for view in list(self.ingestor.views.values()):
            counts[view.state.value] += 1
        return counts

    def start(self, poll_timeout_s: float = 0.05) -> None:
        """Pump events and run :meth:`tick` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(poll_timeout_s,),
                                        name="router-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------ helpers

    def _run(self, poll_timeout_s: float) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            try:
                self.pump_events(timeout_s=poll_timeout_s)
                if self.clock() - last_tick >= 0.1:
                    self.tick()
                    last_tick = self.clock()
            except Exception:  # keep routing on a transport hiccup; say it loudly
                log.exception("router: event loop error")
                self._stop.wait(poll_timeout_s)

    def _candidates(self) -> tuple[Candidates, dict[str, str], int]:
        alive = self.registry.alive()
        if not alive:
            raise NoInstanceError(
                f"no live instance: no heartbeat within {self.registry.ttl_s} s")
        cache = self._cache
        if cache is not None and cache[0] is alive and cache[1] == self.ingestor.version:
            return cache[2], cache[3], cache[4]
        trusted, excluded = self._split(alive)
        with self.ingestor.lock:
            slots = [self.index.slot(i.instance_id) for i in trusted]
            mask = self.index.slot_mask(slots)
        candidates = Candidates([i.instance_id for i in trusted], [i.load for i in trusted],
                                slots, self.tokens_per_hash)
        self._cache = (alive, self.ingestor.version, candidates, excluded, mask)
        return candidates, excluded, mask

    def _split(self, alive: list[InstanceInfo]) -> tuple[list[InstanceInfo], dict[str, str]]:
        trusted, excluded = [], {}
        for info in alive:
            view = self.ingestor.view(info.instance_id)
            if view.trusted:
                trusted.append(info)
            else:
                excluded[info.instance_id] = f"{view.state.value}: {view.reason}"
        return trusted, excluded

    def _fallback(self, excluded: dict[str, str]) -> RouteDecision:
        alive = self.registry.alive()
        best = min(alive, key=lambda i: (i.load.queued_prefill_tokens,
                                         i.load.active_decode_requests, i.instance_id))
        reason = ("fallback: no live instance has a trusted KV view, least-loaded chosen "
                  "without prefix scoring; " + "; ".join(f"{k} {v}" for k, v in excluded.items()))
        log.warning("router: %s", reason)  # the states themselves were logged as errors
        return RouteDecision([best.instance_id], 0, 0, reason, "fallback", dict(excluded))


def build_router(config: ClusterConfig, settings: HashSettings,
                 clock: Callable[[], float] = time.time) -> Router:
    """Embedded (in-process bus and registry) or cluster mode (``config.redis_url``).

    ``settings`` are what the workers announce: kvstore-backed workers hash per store
    chunk (``tokens_per_hash = store.chunk_tokens``, kvcluster.worker.node.hash_settings).
    """
    rc = config.router
    if not config.redis_url:
        return Router(rc, settings, clock=clock)
    import redis

    from router.redis_bus import RedisStreamEventBus
    from router.redis_registry import RedisRegistry

    client = redis.Redis.from_url(config.redis_url)
    bus = RedisStreamEventBus(client, rc.redis_prefix, rc.consumer_group,
                              consumer=rc.consumer_group, maxlen=rc.stream_maxlen)
    registry = RedisRegistry(client, rc.heartbeat_ttl_s, rc.redis_prefix,
                             rc.registry_refresh_s, clock)
    return Router(rc, settings, bus, registry, clock=clock)
