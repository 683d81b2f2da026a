"""Applies KV event batches to the index, guarding sequence and hash settings.

Per instance, a batch is applied when it is

* a reset batch (first event AllCleared(None)): always -- it states the whole cache;
* the first batch seen and its seq is 0;
* exactly the next sequence number.

A batch with a smaller seq is a duplicate (e.g. a replay) and is skipped. A
larger one is a *gap*: the instance's view turns RESYNCING (excluded from
prefix scoring), a snapshot is requested through the bus, and batches are
dropped until the reset batch arrives; the request is repeated every
``resync_timeout_s``. A batch whose HashSettings differ from the router's (model
id, block size, tokens per hash, hash version) is never applied: the instance is
flagged HASH_MISMATCH (logged as an error, named in every decision's ``excluded``,
counted in ``refused_batches``) until a batch with matching settings arrives,
which must be a reset batch (its snapshot). A registered instance that
sends no batch within ``silent_window_s`` is flagged SILENT.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

from kvcluster.common.events import HashSettings, KVEventBatch
from router.event_bus import EventBus, is_reset
from router.index import KVIndex
from router.kv_view import InstanceView, ViewState


class EventIngestor:
    def __init__(self, index: KVIndex, settings: HashSettings, bus: EventBus,
                 resync_timeout_s: float = 2.0, clock: Callable[[], float] = time.time,
                 lock: threading.Lock | None = None):
        self.index = index
        self.settings = settings
        self.bus = bus
        self.resync_timeout_s = resync_timeout_s
        self.clock = clock
        self.lock = lock or threading.Lock()
        """Held while the index changes; the router holds it while it reads."""
        self.views: dict[str, InstanceView] = {}
        self.version = 0
        """Bumped whenever any instance's view state changes."""
        self.block_events = 0
        self.refused_batches = 0
        """Batches never applied because their hash settings differ from the router's."""

    # ------------------------------------------------------------ public API

    def pump(self, max_batches: int = 1024, timeout_s: float = 0.0) -> int:
        """Read and apply one round of batches from the bus. Returns batches read."""
        batches = self.bus.read(max_batches, timeout_s)
        for batch in batches:
            self.apply(batch)
        self.bus.ack()
        return len(batches)

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one batch if the protocol allows it. Returns whether it was applied."""
        view = self.view(batch.instance_id)
        view.last_batch_at = self.clock()
        view.settings = batch.settings
        if batch.settings != self.settings:
            self._refuse(view, batch)
            return False
        if self._in_order(view, batch):
            self._apply_in_order(view, batch)
            return True
        if view.next_seq is not None and batch.seq < view.next_seq \
                and view.state is not ViewState.HASH_MISMATCH:
            return False  # duplicate
        self._on_gap(view, batch)
        return False

    def check(self, registered: Mapping[str, float], silent_window_s: float) -> None:
        """Flag silent instances and repeat overdue resync requests.

        Args:
            registered: instance id -> registration time (same clock) of live instances.
        """
        now = self.clock()
        for instance_id, registered_at in list(registered.items()):
            view = self.view(instance_id)
            if view.last_batch_at is None and now - registered_at > silent_window_s:
                self._set(view, ViewState.SILENT,
                          f"no KV events {now - registered_at:.1f} s after registering "
                          f"(window {silent_window_s} s); is its KVEventPublisher wired?")
        for view in list(self.views.values()):  # route() may add views meanwhile
            if view.state is ViewState.RESYNCING and view.resync_requested_at is not None \
                    and now - view.resync_requested_at > self.resync_timeout_s:
                self._request_resync(view)

    def view(self, instance_id: str) -> InstanceView:
        view = self.views.get(instance_id)
        if view is None:
            view = self.views[instance_id] = InstanceView(instance_id)
            self.version += 1
        return view

    def forget(self, instance_id: str) -> None:
        with self.lock:
            self.index.forget(instance_id)
        self.views.pop(instance_id, None)
        self.version += 1

    # ------------------------------------------------------------ helpers

    def _in_order(self, view: InstanceView, batch: KVEventBatch) -> bool:
        if is_reset(batch):
            return True
        if view.state in (ViewState.RESYNCING, ViewState.HASH_MISMATCH):
            return False
        if view.next_seq is None:
            return batch.seq == 0
        return batch.seq == view.next_seq

    def _apply_in_order(self, view: InstanceView, batch: KVEventBatch) -> None:
        with self.lock:
            count = self.index.apply(batch.instance_id, batch.events)
        view.next_seq = batch.seq + 1
        view.batches += 1
        view.block_events += count
        self.block_events += count
        if view.state is not ViewState.OK:
            self._set(view, ViewState.OK, f"in sync at seq {batch.seq}")
        view.resync_requested_at = None

    def _on_gap(self, view: InstanceView, batch: KVEventBatch) -> None:
        if view.state is ViewState.RESYNCING:
            return
        view.gaps += 1
        expected = "seq 0 or a reset batch" if view.next_seq is None else f"seq {view.next_seq}"
        self._set(view, ViewState.RESYNCING,
                  f"sequence gap: expected {expected}, got {batch.seq}; snapshot requested")
        self._request_resync(view)

    def _request_resync(self, view: InstanceView) -> None:
        view.resync_requested_at = self.clock()
        self.bus.request_resync(view.instance_id)

    def _refuse(self, view: InstanceView, batch: KVEventBatch) -> None:
        view.refused_batches += 1
        self.refused_batches += 1
        differ = "; ".join(batch.settings.differences(self.settings))
        self._set(view, ViewState.HASH_MISMATCH,
                  f"hash settings differ (worker vs router: {differ}): worker hashes with "
                  f"{batch.settings}, router expects {self.settings}; its blocks can never "
                  "match, batches refused")

    def _set(self, view: InstanceView, state: ViewState, reason: str) -> None:
        if view.state is not state or view.reason != reason:
            view.set_state(state, reason)
            self.version += 1
