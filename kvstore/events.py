"""Turning store changes into KV events, in order, for the subscribers.

Consecutive chunks of one put that land in the same tier, each the parent of
the next, are merged into one ``BlockStored`` run; any other event first
flushes the pending run, so subscribers always see changes in the order they
happened (a chunk is never "removed" before it was "stored").
"""

from __future__ import annotations

import logging
from typing import Callable

from kvcluster.common.events import BlockRemoved, BlockStored, KVEvent, Tier

log = logging.getLogger(__name__)


class EventSink:
    def __init__(self) -> None:
        self.subscribers: list[Callable[[KVEvent], None]] = []
        self._run_tier: Tier | None = None
        self._run_hashes: list[int] = []
        self._run_parent: int | None = None
        self._run_last: bytes | None = None

    def stored(self, digest: bytes, tier: Tier, parent: bytes | None) -> None:
        """Chunk ``digest`` now lives in ``tier``; ``parent`` is the chunk before it."""
        if self._run_hashes and tier == self._run_tier and parent == self._run_last:
            self._run_hashes.append(_u64(digest))
        else:
            self.flush()
            self._run_tier, self._run_hashes = tier, [_u64(digest)]
            self._run_parent = None if parent is None else _u64(parent)
        self._run_last = digest

    def removed(self, digests: list[bytes], tier: Tier) -> None:
        self.emit(BlockRemoved(tuple(_u64(d) for d in digests), tier))

    def emit(self, event: KVEvent) -> None:
        self.flush()
        self._publish(event)

    def flush(self) -> None:
        """Publish the pending stored run, if any."""
        if self._run_hashes:
            event = BlockStored(tuple(self._run_hashes), self._run_tier, self._run_parent)
            self._run_hashes, self._run_last = [], None
            self._publish(event)

    def _publish(self, event: KVEvent) -> None:
        for callback in list(self.subscribers):
            try:
                callback(event)
            except Exception:  # a subscriber never breaks the store
                log.exception("kvstore event subscriber failed")


def _u64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little")
