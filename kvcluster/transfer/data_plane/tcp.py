"""The tcp data plane, receiver side: our own socket channel into registered windows.

A listener beside the gRPC server (``transfer.host``, ``data_plane_port``)
accepts the senders' connections (several per sender, TLS when the transfer's
TLS is on); one thread per connection reads a frame header
(:mod:`.tcp_framing`), checks it against the live transfers' one-time tokens
and windows, and only then ``recv_into``s the stripe straight into the window
(no copy in user space; the GIL is released while it waits). A write is
complete when its stripes cover it; the session then checks it against the
chunk's DataRef and checksum.

A window is reused only once no stripe into it is in progress: the receiver
is the only writer here, and a revoked token admits no new stripe, so a
transfer that ended abnormally cannot write into the next one's window.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass, field

import numpy as np

from kvcluster.transfer.data_plane.base import (
    DataPlaneError, ReceiverPlane, Window, check_range,
)
from kvcluster.transfer.data_plane.tcp_framing import HEADER_BYTES, TOKEN_BYTES, FrameHeader, parse
from kvcluster.transfer.data_plane.window_pool import WindowPool
from kvcluster.transfer.messages import DataPlaneGrant, DataRef, StreamHeader

log = logging.getLogger(__name__)


class TcpReceiverPlane(ReceiverPlane):
    name = "tcp"

    def __init__(self, host: str, port: int, budget_bytes: int, num_connections: int,
                 idle_timeout_s: float, ssl_context: ssl.SSLContext | None = None):
        """
        Args:
            host, port: where to listen (port 0: a free one).
            budget_bytes: registered window memory at most.
            num_connections: connections each sender may open (told in the grant).
            idle_timeout_s: a stripe whose bytes stop for this long closes its connection.
        """
        self.host, self.port = host, port
        self.num_connections = num_connections
        self.idle_timeout_s = idle_timeout_s
        self.ssl_context = ssl_context
        self.pool = WindowPool(registered_buffer, lambda buffer: None, len, budget_bytes)
        self._leases: dict[bytes, _Lease] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._closed = threading.Event()
        self.rejected_frames = 0

    async def start(self) -> None:
        if self._listener is not None:
            return
        self._listener = socket.create_server((self.host, self.port), backlog=64)
        self._listener.settimeout(0.5)  # the accept loop notices stop()
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="kv-dp-accept", daemon=True).start()

    async def stop(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)
        self.pool.close()

    @property
    def address(self) -> str:
        wildcard = self.host in ("", "0.0.0.0", "::")
        return f"{'' if wildcard else self.host}:{self.port}"

    def open(self, header: StreamHeader, window_bytes: int) -> Window | None:
        buffer = self.pool.take(window_bytes)
        if buffer is None:
            return None
        token = secrets.token_bytes(TOKEN_BYTES)
        lease = _Lease(self, token, buffer, asyncio.get_running_loop())
        with self._lock:
            self._leases[token] = lease
        grant = DataPlaneGrant("tcp", token, len(buffer), self.address, self.num_connections)
        return TcpWindow(lease, grant)

    def stats(self) -> dict:
        return {"address": self.address, "registered_bytes": self.pool.registered_bytes,
                "live_transfers": len(self._leases), "rejected_frames": self.rejected_frames}

    # ------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, peer), name="kv-dp-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        with self._lock:
            self._connections.add(conn)
        try:
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            self._read_frames(conn)
        except (DataPlaneError, ValueError) as exc:  # FramingError is a ValueError
            self.rejected_frames += 1
            log.warning("tcp data plane: closing the connection from %s: %s", peer, exc)
        except (OSError, ssl.SSLError) as exc:
            log.debug("tcp data plane: connection from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            _shutdown(conn)

    def _read_frames(self, conn: socket.socket) -> None:
        header_buf = bytearray(HEADER_BYTES)
        while not self._closed.is_set():
            conn.settimeout(None)  # idle between transfers
            if not recv_exact(conn, memoryview(header_buf)):
                return
            header = parse(header_buf)
            lease, target = self._begin(header)
            conn.settimeout(self.idle_timeout_s)
            complete = False
            try:
                complete = recv_exact(conn, target)
            finally:
                lease.end(header, complete)
            if not complete:
                raise DataPlaneError("connection closed in the middle of a stripe")

    def _begin(self, header: FrameHeader) -> tuple["_Lease", memoryview]:
        """Admit one stripe: a live token and a range inside its window (before any byte)."""
        with self._lock:
            lease = self._leases.get(header.token)
            if lease is None:
                raise DataPlaneError("unknown, expired or replayed transfer token")
            check_range(header.stripe_offset, header.stripe_length, lease.size)
            lease.begin(header)
        return lease, lease.view[header.stripe_offset:header.stripe_offset + header.stripe_length]

    def _revoke(self, lease: "_Lease") -> None:
        with self._lock:
            self._leases.pop(lease.token, None)
            lease.revoked = True
        self._stripe_done(lease)

    def _stripe_done(self, lease: "_Lease") -> None:
        """A revoked window with no stripe in progress goes back to the pool (once)."""
        with self._lock:
            free = lease.revoked and lease.active == 0 and not lease.given_back
            lease.given_back |= free
        if free:
            self.pool.give(lease.buffer)


@dataclass
class _Write:
    length: int
    landed: int = 0
    low: int = -1
    high: int = -1
    failed: str = ""
    active: int = 0
    """Stripes of this write being read now."""

    @property
    def complete(self) -> bool:
        """Every byte in, or failed with no stripe still landing (only then may the
        sender be told, by a nak, to reuse the range)."""
        return self.active == 0 and (bool(self.failed) or self.landed >= self.length)


@dataclass
class _Lease:
    """One transfer's window on the tcp plane (state shared with connection threads)."""

    plane: TcpReceiverPlane
    token: bytes
    buffer: np.ndarray
    loop: asyncio.AbstractEventLoop
    active: int = 0
    revoked: bool = False
    given_back: bool = False
    writes: dict[int, _Write] = field(default_factory=dict)
    used_ids: set[int] = field(default_factory=set)
    waiters: dict[int, asyncio.Future] = field(default_factory=dict)

    def __post_init__(self):
        self.view = memoryview(self.buffer)
        self.size = len(self.buffer)

    def begin(self, header: FrameHeader) -> None:
        """A stripe starts (plane lock held)."""
        if header.write_id in self.used_ids:
            raise DataPlaneError(f"write {header.write_id} was already consumed (replay)")
        write = self.writes.setdefault(header.write_id, _Write(header.write_length))
        if write.length != header.write_length:
            raise DataPlaneError(f"write {header.write_id}: stripes disagree on its length")
        write.active += 1
        self.active += 1

    def end(self, header: FrameHeader, complete: bool) -> None:
        """A stripe ended, fully read or not (connection thread)."""
        with self.plane._lock:
            self.active -= 1
            write = self.writes.get(header.write_id)
            if write is None:  # already taken by the session: nothing to record
                done = False
            else:
                write.active -= 1
            if write is None:
                pass
            elif complete:
                end = header.stripe_offset + header.stripe_length
                write.landed += header.stripe_length
                write.low = header.stripe_offset if write.low < 0 else min(write.low,
                                                                           header.stripe_offset)
                write.high = max(write.high, end)
            else:
                write.failed = "the connection broke while the chunk's bytes were arriving"
            done = write is not None and write.complete
        self.plane._stripe_done(self)
        if done:
            try:
                self.loop.call_soon_threadsafe(self._wake, header.write_id)
            except RuntimeError:  # the loop is gone: nobody waits
                pass

    def _wake(self, write_id: int) -> None:
        waiter = self.waiters.pop(write_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TcpWindow(Window):
    def __init__(self, lease: _Lease, grant: DataPlaneGrant):
        self.lease, self.grant = lease, grant

    @property
    def size(self) -> int:
        return self.lease.size

    def view(self, offset: int, length: int) -> memoryview:
        check_range(offset, length, self.size)
        return self.lease.view[offset:offset + length]

    async def landed(self, ref: DataRef, timeout_s: float) -> memoryview:
        check_range(ref.offset, ref.length, self.size)
        lease = self.lease
        with lease.plane._lock:
            write = lease.writes.get(ref.write_id)
            waiting = write is None or not write.complete
            if waiting:
                waiter = lease.loop.create_future()
                lease.waiters[ref.write_id] = waiter
        if waiting:
            await asyncio.wait_for(waiter, timeout_s)
        with lease.plane._lock:
            write = lease.writes.pop(ref.write_id)
            lease.used_ids.add(ref.write_id)
        _check_write(write, ref)
        return lease.view[ref.offset:ref.offset + ref.length]

    def close(self, clean: bool) -> None:
        for waiter in self.lease.waiters.values():
            waiter.cancel()
        self.lease.waiters.clear()
        if not self.lease.revoked:
            self.lease.plane._revoke(self.lease)


def _check_write(write: _Write, ref: DataRef) -> None:
    if write.failed:
        raise DataPlaneError(write.failed)
    if write.length != ref.length:
        raise DataPlaneError(f"the data frames carry {write.length} bytes, the chunk header "
                             f"says {ref.length}")
    if (write.low, write.high, write.landed) != (ref.offset, ref.offset + ref.length, ref.length):
        raise DataPlaneError(f"the data frames cover [{write.low}, {write.high}), the chunk "
                             f"header says [{ref.offset}, {ref.offset + ref.length})")


def recv_exact(conn: socket.socket, target: memoryview) -> bool:
    """Fill ``target`` from ``conn``; False at EOF (clean only before the first byte
    of a header; the caller decides)."""
    position, size = 0, len(target)
    while position < size:
        received = conn.recv_into(target[position:], size - position)
        if received == 0:
            return False
        position += received
    return True


def registered_buffer(num_bytes: int) -> np.ndarray:
    """Receive memory, every page touched now (pinned where CUDA is up, so a GPU
    copy can start from it)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        buffer = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True).numpy()
    else:
        buffer = np.empty(num_bytes, dtype=np.uint8)
    buffer[::4096] = 0
    return buffer


def server_ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext | None:
    """TLS for the listener from the transfer server's certificate (mutual with a CA)."""
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
