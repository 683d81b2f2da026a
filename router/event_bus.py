"""How KV event batches travel from workers to the router: one interface.

Worker side: :meth:`EventBus.publish` a batch, and :meth:`take_resync_request`
to learn that the router saw a gap and wants a snapshot. Router side:
:meth:`read` batches (in per-instance publish order), :meth:`ack` them once
applied, and :meth:`request_resync` of an instance.

Implementations: :class:`router.local_bus.InProcessEventBus` (embedded
default) and :class:`router.redis_bus.RedisStreamEventBus` (cluster mode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvcluster.common.events import AllCleared, KVEventBatch


class EventBus(ABC):
    # ---------------------------------------------------------- worker side

    @abstractmethod
    def publish(self, batch: KVEventBatch) -> None:
        """Send one batch; batches of one instance arrive in publish order."""

    @abstractmethod
    def take_resync_request(self, instance_id: str) -> bool:
        """True (once) when the router asked ``instance_id`` for a snapshot."""

    # ---------------------------------------------------------- router side

    @abstractmethod
    def read(self, max_batches: int = 1024, timeout_s: float = 0.0) -> list[KVEventBatch]:
        """Up to ``max_batches`` batches; waits at most ``timeout_s`` for the first."""

    def ack(self) -> None:
        """Mark everything returned by :meth:`read` so far as applied."""

    @abstractmethod
    def request_resync(self, instance_id: str) -> None:
        """Ask ``instance_id`` to publish a snapshot (a reset batch)."""

    def close(self) -> None:
        pass


def is_reset(batch: KVEventBatch) -> bool:
    """A batch starting with AllCleared(tier=None) states an instance's whole cache.

    The state after it does not depend on earlier batches, so the router accepts
    it whatever the sequence gap: it is how snapshots (resyncs) and restarted
    workers (seq back to 0) are sent.
    """
    return bool(batch.events) and isinstance(batch.events[0], AllCleared) \
        and batch.events[0].tier is None


def make_event_bus(redis_url: str = "", prefix: str = "kvcluster", group: str = "router",
                   maxlen: int = 100_000) -> EventBus:
    """In-process queue when ``redis_url`` is empty, else Redis Streams."""
    if not redis_url:
        from router.local_bus import InProcessEventBus

        return InProcessEventBus()
    import redis

    from router.redis_bus import RedisStreamEventBus

    return RedisStreamEventBus(redis.Redis.from_url(redis_url), prefix, group, maxlen=maxlen)
