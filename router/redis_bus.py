"""Cluster-mode event bus: one Redis Stream, one consumer group per router.

Layout (``P`` is the key prefix)::

    P:events          stream; one entry per batch, field b"b" = KVEventBatch JSON
                      (XADD ... MAXLEN ~ maxlen)
    P:resync:{id}     key set by the router when it wants a snapshot of {id};
                      the worker's publisher DELetes it and publishes a reset batch

Each router reads through its own consumer group (every router needs every
event). A restarted router with the same group name first replays the stream's
retained history up to the group's last-delivered id (rebuilding its index;
per-instance sequence numbers make the replay idempotent), then reads new
entries with XREADGROUP ">" -- including everything published while it was
down. Where history was trimmed the replay shows a sequence gap, and the usual
gap -> resync path fills it in.
"""

from __future__ import annotations

from kvcluster.common.events import KVEventBatch
from router.event_bus import EventBus

_FIELD = b"b"


class RedisStreamEventBus(EventBus):
    def __init__(self, client, prefix: str = "kvcluster", group: str = "router",
                 consumer: str = "router", maxlen: int = 100_000, resync_ttl_s: int = 60):
        """Args: client: a ``redis.Redis`` returning bytes."""
        self._redis = client
        self._prefix = prefix
        self._stream = f"{prefix}:events"
        self._group = group
        self._consumer = consumer
        self._maxlen = maxlen
        self._resync_ttl_s = resync_ttl_s
        self._started = False
        self._replay: tuple[bytes, bytes] | None = None  # (exclusive start, inclusive end)
        self._unacked: list[bytes] = []
        self.replayed_batches = 0

    # ---------------------------------------------------------- worker side

    def publish(self, batch: KVEventBatch) -> None:
        self._redis.xadd(self._stream, {_FIELD: batch.to_json()},
                         maxlen=self._maxlen, approximate=True)

    def take_resync_request(self, instance_id: str) -> bool:
        return self._redis.delete(self._resync_key(instance_id)) == 1

    # ---------------------------------------------------------- router side

    def read(self, max_batches: int = 1024, timeout_s: float = 0.0) -> list[KVEventBatch]:
        if not self._started:
            self._start()
        if self._replay is not None:
            return self._read_replay(max_batches)
        import redis

        block_ms = int(timeout_s * 1000)
        try:
            resp = self._redis.xreadgroup(self._group, self._consumer, {self._stream: ">"},
                                          count=max_batches,
                                          block=block_ms if block_ms > 0 else None)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._started = False  # the stream was lost (e.g. Redis restarted): recreate
            return []
        entries = resp[0][1] if resp else []
        self._unacked.extend(entry_id for entry_id, _ in entries)
        return [KVEventBatch.from_json(fields[_FIELD]) for _, fields in entries]

    def ack(self) -> None:
        if self._unacked:
            self._redis.xack(self._stream, self._group, *self._unacked)
            self._unacked.clear()

    def request_resync(self, instance_id: str) -> None:
        self._redis.set(self._resync_key(instance_id), b"1", ex=self._resync_ttl_s)

    def close(self) -> None:
        self._redis.close()

    # ------------------------------------------------------------ helpers

    def _resync_key(self, instance_id: str) -> str:
        return f"{self._prefix}:resync:{instance_id}"

    def _start(self) -> None:
        """Create the group (reading from the start), or plan a replay of its history."""
        import redis

        self._started = True
        try:
            self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
            return
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last = self._last_delivered_id()
        if last and last != b"0-0":
            self._replay = (b"-", last)
        self._ack_pending()

    def _last_delivered_id(self) -> bytes | None:
        for info in self._redis.xinfo_groups(self._stream):
            name = info["name"]
            if (name.decode() if isinstance(name, bytes) else name) == self._group:
                last = info["last-delivered-id"]
                return last if isinstance(last, bytes) else str(last).encode()
        return None

    def _ack_pending(self) -> None:
        """Entries delivered to a previous life of this router: the replay covers them."""
        while True:
            pending = self._redis.xpending_range(self._stream, self._group, "-", "+", 1000)
            if not pending:
                return
            self._redis.xack(self._stream, self._group, *[p["message_id"] for p in pending])

    def _read_replay(self, max_batches: int) -> list[KVEventBatch]:
        start, end = self._replay
        entries = self._redis.xrange(self._stream, start, end, count=max_batches)
        if not entries or entries[-1][0] == end:
            self._replay = None
        else:
            self._replay = (b"(" + entries[-1][0], end)
        self.replayed_batches += len(entries)
        return [KVEventBatch.from_json(fields[_FIELD]) for _, fields in entries]
