"""Worker side of the event protocol: batch, number and publish KV events.

Plug :meth:`KVEventPublisher.on_event` into the kvstore's ``on_event`` callback.
Events are batched (flushed by size, by :meth:`flush`, or by the background
thread), each batch numbered with the instance's next sequence number (0, 1,
2, ...) and stamped with the worker's :class:`HashSettings`.

The publisher also tracks which blocks the worker holds (from the same events)
so it can answer a resync request with a *reset batch*: AllCleared(None)
followed by one BlockStored per tier. :meth:`announce` publishes one at start,
so a worker that restarts (seq back to 0) replaces its old view at once; a
publisher's first batch is a reset batch even when ``announce`` was not called
(the events queued before it are covered by its snapshot).
A kvstore may pass its own ``snapshot_fn`` to be the source of truth instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from kvcluster.common.events import (AllCleared, BlockRemoved, BlockStored, HashSettings,
                                     KVEvent, KVEventBatch, Tier)
from router.event_bus import EventBus

log = logging.getLogger("router.publisher")


class KVEventPublisher:
    def __init__(self, instance_id: str, settings: HashSettings, bus: EventBus,
                 max_batch_events: int = 512,
                 snapshot_fn: Callable[[], list[BlockStored]] | None = None):
        self.instance_id = instance_id
        self.settings = settings
        self._bus = bus
        self._max_batch_events = max_batch_events
        self._snapshot_fn = snapshot_fn
        self._held: list[dict[int, None]] = [{} for _ in Tier]  # ordered sets per tier
        self._pending: list[KVEvent] = []
        self._next_seq = 0
        self._announced = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public API

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def on_event(self, event: KVEvent) -> None:
        """The kvstore callback: record and queue one event (thread-safe)."""
        with self._lock:
            self._track(event)
            self._pending.append(event)
            if len(self._pending) >= self._max_batch_events:
                self._flush_locked()

    def flush(self) -> int:
        """Publish queued events as one batch. Returns the number of events sent."""
        with self._lock:
            return self._flush_locked()

    def announce(self) -> None:
        """Publish a reset batch with the full current state (start-up and resync)."""
        with self._lock:
            if self._announced:
                self._flush_locked()
            self._pending = []  # before the first reset: the snapshot covers them
            self._publish_reset_locked()

    def poll_resync(self) -> bool:
        """Answer a pending resync request with a snapshot. True if one was sent."""
        if not self._bus.take_resync_request(self.instance_id):
            return False
        log.warning("publisher %s: router asked for a resync", self.instance_id)
        self.announce()
        return True

    def snapshot(self) -> list[BlockStored]:
        """Every block held, one BlockStored per non-empty tier, in insertion order."""
        if self._snapshot_fn is not None:
            return list(self._snapshot_fn())
        return [BlockStored(tuple(held), Tier(t)) for t, held in enumerate(self._held) if held]

    def start(self, flush_interval_s: float = 0.01, resync_poll_s: float = 0.1) -> None:
        """Announce, then flush and poll for resync requests in a daemon thread."""
        self.announce()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(flush_interval_s, resync_poll_s),
                                        name=f"kv-publisher-{self.instance_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    # ------------------------------------------------------------ helpers

    def _run(self, flush_interval_s: float, resync_poll_s: float) -> None:
        since_poll = 0.0
        while not self._stop.wait(flush_interval_s):
            self.flush()
            since_poll += flush_interval_s
            if since_poll >= resync_poll_s:
                since_poll = 0.0
                try:
                    self.poll_resync()
                except Exception:  # a transport hiccup must not kill the thread
                    log.exception("publisher %s: resync poll failed", self.instance_id)

    def _flush_locked(self) -> int:
        events, self._pending = self._pending, []
        if not self._announced:  # a publisher's first batch is always a reset
            self._publish_reset_locked()
        elif events:
            self._publish_locked(events)
        return len(events)

    def _publish_reset_locked(self) -> None:
        self._publish_locked([AllCleared(None), *self.snapshot()])
        self._announced = True

    def _publish_locked(self, events: list[KVEvent]) -> None:
        batch = KVEventBatch(self.instance_id, self._next_seq, self.settings, events)
        self._next_seq += 1
        try:
            self._bus.publish(batch)
        except Exception as exc:  # bus down (Redis restarting): never kill the caller or
            # the flush thread; the lost seq shows up as a gap and the router resyncs.
            log.error("publisher %s: batch %d lost: %r", self.instance_id, batch.seq, exc)

    def _track(self, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            held = self._held[event.tier]
            for h in event.block_hashes:
                held[h] = None
        elif isinstance(event, BlockRemoved):
            held = self._held[event.tier]
            for h in event.block_hashes:
                held.pop(h, None)
        elif isinstance(event, AllCleared):
            for t in range(len(self._held)) if event.tier is None else (int(event.tier),):
                self._held[t] = {}
