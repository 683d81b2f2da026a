"""The embedded default event bus: an in-process queue."""

from __future__ import annotations

import queue
import threading

from kvcluster.common.events import KVEventBatch
from router.event_bus import EventBus


class InProcessEventBus(EventBus):
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[KVEventBatch] = queue.SimpleQueue()
        self._resync: set[str] = set()
        self._lock = threading.Lock()

    def publish(self, batch: KVEventBatch) -> None:
        self._queue.put(batch)

    def take_resync_request(self, instance_id: str) -> bool:
        with self._lock:
            if instance_id in self._resync:
                self._resync.discard(instance_id)
                return True
        return False

    def read(self, max_batches: int = 1024, timeout_s: float = 0.0) -> list[KVEventBatch]:
        out: list[KVEventBatch] = []
        try:
            out.append(self._queue.get(timeout=timeout_s) if timeout_s > 0
                       else self._queue.get_nowait())
            while len(out) < max_batches:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return out

    def request_resync(self, instance_id: str) -> None:
        with self._lock:
            self._resync.add(instance_id)
