"""Instance registry on Redis: one key per instance with a TTL.

Workers ``SET {prefix}:instance:{id} <json> PX ttl`` on every heartbeat and add
their id to the set ``{prefix}:instances``. The router re-reads the keys at
most every ``refresh_s`` and also checks each heartbeat's wall-clock time
against the TTL at every call, so a dead instance leaves :meth:`alive` within
the TTL even between refreshes (this assumes NTP-synchronised clocks).

While Redis is unreachable the registry keeps working from what this process
itself last wrote (the front end heartbeats every instance it polls), so
routing degrades to local knowledge instead of failing; writes resume, and the
keys reappear, as soon as Redis answers again.
"""

from __future__ import annotations

import time
import logging
from dataclasses import replace

from router.load import InstanceInfo, InstanceLoad
from router.registry import Clock, InstanceRegistry

log = logging.getLogger("router.registry")


class RedisRegistry(InstanceRegistry):
    def __init__(self, client, ttl_s: float, prefix: str = "kvcluster",
                 refresh_s: float = 0.2, clock: Clock = time.time):
        """Args: client: a ``redis.Redis`` (bytes responses)."""
        super().__init__(ttl_s, clock)
        self._redis = client
        self._prefix = prefix
        self._refresh_s = refresh_s
        self._known: list[InstanceInfo] = []
        self._refreshed_at = float("-inf")
        self._alive: tuple[tuple, list[InstanceInfo]] = ((), [])
        self._local: dict[str, InstanceInfo] = {}
        """What this process last wrote per instance: the fallback while Redis is down."""
        self._down = False

    def register(self, instance_id: str, address: str = "", role: str = "both",
                 load: InstanceLoad | None = None) -> None:
        now = self.clock()
        self._write(InstanceInfo(instance_id, address, role, now, now, load or InstanceLoad()))

    def heartbeat(self, instance_id: str, load: InstanceLoad | None = None) -> None:
        raw = self._guard(lambda: self._redis.get(self._key(instance_id)), None)
        now = self.clock()
        local = self._local.get(instance_id)
        info = InstanceInfo.from_json(raw) if raw else (
            local or InstanceInfo(instance_id, registered_at=now))
        self._write(replace(info, last_heartbeat=now, load=load or info.load))

    def deregister(self, instance_id: str) -> None:
        self._local.pop(instance_id, None)
        self._known = [i for i in self._known if i.instance_id != instance_id]
        pipe = self._redis.pipeline()
        pipe.delete(self._key(instance_id))
        pipe.srem(self._members_key, instance_id)
        self._guard(pipe.execute, None)
        self._refreshed_at = float("-inf")

    def alive(self) -> list[InstanceInfo]:
        now = self.clock()
        if now - self._refreshed_at >= self._refresh_s:
            self._refresh()
            self._refreshed_at = now
        live = [i for i in self._known if now - i.last_heartbeat <= self.ttl_s]
        key = tuple((i.instance_id, i.last_heartbeat) for i in live)
        if key != self._alive[0]:
            self._alive = (key, live)
        return self._alive[1]

    # ------------------------------------------------------------ helpers

    @property
    def _members_key(self) -> str:
        return f"{self._prefix}:instances"

    def _key(self, instance_id: str) -> str:
        return f"{self._prefix}:instance:{instance_id}"

    def _write(self, info: InstanceInfo) -> None:
        self._local[info.instance_id] = info
        pipe = self._redis.pipeline()
        pipe.set(self._key(info.instance_id), info.to_json(), px=max(1, int(self.ttl_s * 1000)))
        pipe.sadd(self._members_key, info.instance_id)
        self._guard(pipe.execute, None)

    def _refresh(self) -> None:
        if self._guard(self._refresh_from_redis, False) is False:
            self._known = list(self._local.values())  # Redis down: local knowledge

    def _guard(self, call, fallback):
        """``call()``, or ``fallback`` when Redis is unreachable (logged once per outage)."""
        import redis

        try:
            result = call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not self._down:
                log.error("registry: Redis unreachable (%s); using local heartbeats", exc)
            self._down = True
            return fallback
        if self._down:
            log.warning("registry: Redis reachable again")
            self._down = False
        return result

    def _refresh_from_redis(self) -> None:
        ids = sorted(m.decode() for m in self._redis.smembers(self._members_key))
        raws = self._redis.mget([self._key(i) for i in ids]) if ids else []
        gone = [i for i, raw in zip(ids, raws) if raw is None]
        if gone:
            self._redis.srem(self._members_key, *gone)
        self._known = [InstanceInfo.from_json(raw) for raw in raws if raw is not None]
