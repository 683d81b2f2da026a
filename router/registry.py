"""Instance registry: who is alive (heartbeat within the TTL) and how loaded.

Base class plus the in-process default; :mod:`router.redis_registry` is the
cluster implementation. An instance whose last heartbeat is older than
``ttl_s`` is not returned by :meth:`alive`, so it stops receiving requests
within the TTL.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Callable

from router.load import InstanceInfo, InstanceLoad

Clock = Callable[[], float]


class InstanceRegistry(ABC):
    """Heartbeat-with-TTL membership plus the load each instance reports."""

    def __init__(self, ttl_s: float, clock: Clock = time.time):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.clock = clock

    @abstractmethod
    def register(self, instance_id: str, address: str = "", role: str = "both",
                 load: InstanceLoad | None = None) -> None:
        """Add (or re-add) an instance; counts as a heartbeat."""

    @abstractmethod
    def heartbeat(self, instance_id: str, load: InstanceLoad | None = None) -> None:
        """Refresh the TTL (and the load when given); registers unknown instances."""

    @abstractmethod
    def deregister(self, instance_id: str) -> None: ...

    @abstractmethod
    def alive(self) -> list[InstanceInfo]:
        """Instances whose last heartbeat is within the TTL, sorted by id.

        Returns the same list object while nothing changed, so callers may
        cache what they derive from it by identity.
        """

    def close(self) -> None:
        pass


class InMemoryRegistry(InstanceRegistry):
    """The embedded default: a dict guarded by a lock."""

    def __init__(self, ttl_s: float, clock: Clock = time.time):
        super().__init__(ttl_s, clock)
        self._infos: dict[str, InstanceInfo] = {}
        self._lock = threading.Lock()
        self._version = 0
        self._cached: tuple[int, float, list[InstanceInfo]] = (-1, 0.0, [])

    def register(self, instance_id: str, address: str = "", role: str = "both",
                 load: InstanceLoad | None = None) -> None:
        now = self.clock()
        info = InstanceInfo(instance_id, address, role, now, now, load or InstanceLoad())
        with self._lock:
            self._infos[instance_id] = info
            self._version += 1

    def heartbeat(self, instance_id: str, load: InstanceLoad | None = None) -> None:
        now = self.clock()
        with self._lock:
            info = self._infos.get(instance_id)
            if info is None:
                info = InstanceInfo(instance_id, registered_at=now)
            self._infos[instance_id] = replace(info, last_heartbeat=now, load=load or info.load)
            self._version += 1

    def deregister(self, instance_id: str) -> None:
        with self._lock:
            self._infos.pop(instance_id, None)
            self._version += 1

    def alive(self) -> list[InstanceInfo]:
        now = self.clock()
        version, valid_until, cached = self._cached
        if version == self._version and now <= valid_until:
            return cached
        with self._lock:
            live = sorted((i for i in self._infos.values()
                           if now - i.last_heartbeat <= self.ttl_s), key=lambda i: i.instance_id)
            oldest = min((i.last_heartbeat for i in live), default=now)
            self._cached = (self._version, oldest + self.ttl_s, live)
        return live
