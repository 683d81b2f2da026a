"""The embedded default's event transport across Ray processes.

Each worker publishes into an in-process queue of its own; the front end
drains it through the actor's ``poll`` (together with the heartbeat) and
re-publishes the batches, sequence numbers untouched, into the router's bus.
A resync the router asks for travels back the same way. In cluster mode the
workers publish to Redis Streams instead and ``poll`` returns no events.
"""

from __future__ import annotations

from kvcluster.common.events import KVEventBatch
from router.event_bus import EventBus
from router.local_bus import InProcessEventBus


def drain(bus: EventBus, instance_id: str, resync: bool) -> list[KVEventBatch]:
    """Worker side: take what the publisher queued; forward a resync request."""
    if not isinstance(bus, InProcessEventBus):
        return []
    if resync:
        bus.request_resync(instance_id)
    return bus.read(max_batches=100_000)


def forward(router_bus: EventBus, batches: list[KVEventBatch]) -> None:
    """Front-end side: hand relayed batches to the router."""
    for batch in batches:
        router_bus.publish(batch)
