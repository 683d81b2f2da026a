"""The grpc "data plane": payloads inline in the control stream (``KVChunk.payload``).

Always available, and the fallback of every other plane: a transfer whose
receiver has no window free, a chunk larger than its window, a re-sent chunk
(so a full window can never block the chunk the decoder waits for), a link
that broke mid-transfer. Nothing to register; the grant only says so.
"""

from __future__ import annotations

from kvcluster.transfer.messages import INLINE_PLANE, DataPlaneGrant


def inline_grant(reason: str) -> DataPlaneGrant:
    """The grant that sends this transfer's payloads inline, and why."""
    return DataPlaneGrant(INLINE_PLANE, reason=reason)
