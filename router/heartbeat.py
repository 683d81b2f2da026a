"""Worker side of the registry: heartbeat with the current load on a timer."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from router.load import InstanceLoad
from router.registry import InstanceRegistry

log = logging.getLogger("router.heartbeat")


class Heartbeater:
    """Registers an instance, then heartbeats every ``interval_s`` (default TTL / 3)."""

    def __init__(self, registry: InstanceRegistry, instance_id: str,
                 load_fn: Callable[[], InstanceLoad] = InstanceLoad, address: str = "",
                 role: str = "both", interval_s: float | None = None):
        self.registry = registry
        self.instance_id = instance_id
        self.load_fn = load_fn
        self.address = address
        self.role = role
        self.interval_s = interval_s or registry.ttl_s / 3
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One heartbeat with the current load."""
        self.registry.heartbeat(self.instance_id, self.load_fn())

    def start(self) -> None:
        self.registry.register(self.instance_id, self.address, self.role, self.load_fn())
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-{self.instance_id}")
        self._thread.start()

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if deregister:
            self.registry.deregister(self.instance_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # a missed beat is survivable; the TTL decides
                log.exception("heartbeat %s failed", self.instance_id)
