"""How much the router trusts its view of one instance's KV cache.

An instance is only scored on its prefix hits when its view is ``OK``. Every
other state is a loud, visible condition (``logging.error`` once per change,
and a ``reason`` string in :meth:`Router.status` and in routing decisions),
never an instance silently treated as holding nothing.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from kvcluster.common.events import HashSettings

log = logging.getLogger("router")


class ViewState(enum.Enum):
    PENDING = "pending"
    """Registered, no event batch yet, still inside the silent window."""
    OK = "ok"
    SILENT = "silent"
    """Registered for longer than the silent window without one event batch."""
    HASH_MISMATCH = "hash_mismatch"
    """Its hash settings (model id, block size, tokens per hash, hash version) differ
    from the router's: its batches are refused."""
    RESYNCING = "resyncing"
    """A sequence gap was seen; waiting for the worker's snapshot."""


@dataclass
class InstanceView:
    """What the router knows about one instance's event stream."""

    instance_id: str
    state: ViewState = ViewState.PENDING
    reason: str = "no KV events yet"
    next_seq: int | None = None
    """Sequence number expected next; None before the first accepted batch."""
    batches: int = 0
    block_events: int = 0
    gaps: int = 0
    refused_batches: int = 0
    """Batches refused for their hash settings."""
    resync_requested_at: float | None = None
    last_batch_at: float | None = None
    settings: HashSettings | None = None
    """The settings in the instance's latest batch."""
    history: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        return self.state is ViewState.OK

    def set_state(self, state: ViewState, reason: str) -> None:
        """Change state; errors are logged once per change, recoveries as warnings."""
        if state is self.state and reason == self.reason:
            return
        previous, self.state, self.reason = self.state, state, reason
        self.history = [*self.history[-19:], f"{state.value}: {reason}"]  # the last 20
        if state in (ViewState.SILENT, ViewState.HASH_MISMATCH, ViewState.RESYNCING):
            log.error("router: instance %s KV view %s: %s", self.instance_id, state.value, reason)
        elif previous in (ViewState.SILENT, ViewState.HASH_MISMATCH, ViewState.RESYNCING):
            log.warning("router: instance %s KV view recovered (%s)", self.instance_id, reason)
