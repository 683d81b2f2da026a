"""The data plane: where chunk payload bytes travel beside the gRPC control stream.

The control stream (header, chunk metadata, checksums, acks, status) stays on
gRPC; only payload bytes move here, as one-sided writes into memory the
receiver registered and lent to the transfer (NIXL's and Mooncake's model):

    receiver                                   sender
    ReceiverPlane.open(header) -> Window       (offer in the header)
    Window.grant  ----- DataPlaneGrant ----->  SenderPlane.link(grant) -> DataLink
                                               DataLink.write([(bytes, offset)], write_id)
    Window.landed(ref) <-- KVChunk + DataRef -- (after the write completed)
    ... decode from the window ...
    ------------------ ChunkReleased ------->  offset may be written again
    Window.close(clean)

One backend per file (``grpc_inline``, ``tcp``, ``shm``, ``mooncake``), built
by :mod:`.factory`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

from kvcluster.transfer.messages import DataPlaneGrant, DataPlaneOffer, DataRef, StreamHeader


class DataPlaneError(ConnectionError):
    """Bytes could not be moved or placed: a bad range, token or length, a broken link."""


@dataclass(frozen=True)
class WriteRange:
    """One range of a write: ``local`` bytes go to ``remote_offset`` of the peer's window."""

    local: memoryview
    remote_offset: int


class Window(abc.ABC):
    """Registered receive memory lent to one transfer."""

    grant: DataPlaneGrant
    """What the sender needs to write here (sent on the control stream)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes the sender may write: offsets lie in [0, size)."""

    @abc.abstractmethod
    def view(self, offset: int, length: int) -> memoryview:
        """The window's bytes [offset, offset + length); DataPlaneError outside it."""

    async def landed(self, ref: DataRef, timeout_s: float) -> memoryview:
        """The bytes of ``ref`` once they are all in.

        One-sided writes (shm, mooncake) complete before the sender sends the
        chunk's metadata, so they are there already; tcp waits for its frames.

        Raises:
            DataPlaneError: the range is outside the window, or the write failed.
            asyncio.TimeoutError: the bytes did not arrive within ``timeout_s``.
        """
        return self.view(ref.offset, ref.length)

    @abc.abstractmethod
    def close(self, clean: bool) -> None:
        """The transfer is over. ``clean``: the sender finished (sent its end marker),
        so no write into the window can still come and it may be lent again;
        otherwise a late write might, and the backend must make sure it lands
        nowhere another transfer reads."""


class ReceiverPlane(abc.ABC):
    """The receiver side of one backend: lends windows to transfers."""

    name: str

    async def start(self) -> None:
        """Bind listeners, initialise engines (idempotent)."""

    async def stop(self) -> None:
        """Close listeners and give registered memory back."""

    def unavailable(self, offer: DataPlaneOffer, node_id: str) -> str:
        """Why this plane cannot serve a sender with ``offer``; "" when it can."""
        return ""

    def warm(self, num_bytes: int) -> None:
        """Register one window of ``num_bytes`` now, so the first transfer does not pay
        for it (backends with a window pool; the others need nothing)."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.warm(num_bytes)

    @abc.abstractmethod
    def open(self, header: StreamHeader, window_bytes: int) -> Window | None:
        """A window of at least ``window_bytes`` for one transfer; None when none is free."""

    def stats(self) -> dict:
        return {}


class DataLink(abc.ABC):
    """The sender's end of one granted window."""

    def __init__(self, grant: DataPlaneGrant):
        self.grant = grant

    @property
    def window_bytes(self) -> int:
        return self.grant.window_bytes

    @abc.abstractmethod
    async def write(self, ranges: Sequence[WriteRange], write_id: int) -> None:
        """Write every range into the peer's window; returns once the bytes are placed
        (tcp: handed to the kernel in order, before the chunk's metadata).

        Raises:
            DataPlaneError: the link broke; nothing may be assumed about the bytes.
        """

    def close(self) -> None:
        """The transfer is over (the plane's connections may outlive it)."""


class SenderPlane(abc.ABC):
    """The sender side of one backend, shared by a KVSender's transfers."""

    name: str

    @abc.abstractmethod
    def link(self, grant: DataPlaneGrant, target_host: str) -> DataLink:
        """The link to a granted window (``target_host``: where the gRPC stream goes).

        Raises:
            DataPlaneError: the window cannot be reached from here.
        """

    async def close(self) -> None:
        """Close connections and mappings."""


def check_range(offset: int, length: int, size: int) -> None:
    """Raise DataPlaneError unless [offset, offset + length) lies inside [0, size)."""
    if offset < 0 or length < 0 or offset + length > size:
        raise DataPlaneError(f"range [{offset}, {offset + length}) is outside the "
                             f"registered window of {size} bytes")


def check_ranges(ranges: Sequence[WriteRange], size: int) -> None:
    for r in ranges:
        check_range(r.remote_offset, len(r.local), size)
