"""The tcp data plane, sender side: a few connections per receiver, chunks striped over them.

Connections are per receiver address and outlive transfers (a TLS handshake
per request would cost more than a small chunk); each has one thread that
sends a frame header and its stripe with one ``sendmsg`` (``sendall`` under
TLS) straight from the chunk's bytes, releasing the GIL while the kernel
copies. A write returns once every stripe is in the kernel, in order on its
connection, before the chunk's metadata goes on the control stream.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from kvcluster.transfer.data_plane.base import (
    DataLink, DataPlaneError, SenderPlane, WriteRange, check_ranges,
)
from kvcluster.transfer.data_plane.tcp_framing import FrameHeader, stripes
from kvcluster.transfer.messages import DataPlaneGrant

MIN_STRIPE_BYTES = 1 << 20
"""Stripes smaller than this are not worth another connection's thread hop."""


class TcpSenderPlane(SenderPlane):
    name = "tcp"

    def __init__(self, num_connections: int, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None, server_name: str = ""):
        """
        Args:
            num_connections: most connections per receiver (the grant may allow fewer).
            timeout_s: connect and send timeout; a receiver that stops reading this long
                breaks the link.
            ssl_context: TLS (None: plain TCP); ``server_name`` is checked in the
                receiver's certificate (default: the host).
        """
        self.num_connections = num_connections
        self.timeout_s = timeout_s
        self.ssl_context, self.server_name = ssl_context, server_name
        self._pools: dict[str, _ConnectionPool] = {}

    def link(self, grant: DataPlaneGrant, target_host: str) -> DataLink:
        host, _, port = grant.address.rpartition(":")
        if not port.isdigit():
            raise DataPlaneError(f"tcp grant has no usable address: {grant.address!r}")
        host = host.strip("[]") or target_host
        key = f"{host}:{port}"
        if key not in self._pools:
            count = max(1, min(self.num_connections, grant.num_connections or 1))
            self._pools[key] = _ConnectionPool(host, int(port), count, self)
        return TcpLink(grant, self._pools[key])

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class TcpLink(DataLink):
    def __init__(self, grant: DataPlaneGrant, pool: "_ConnectionPool"):
        super().__init__(grant)
        self.pool = pool

    async def write(self, ranges: Sequence[WriteRange], write_id: int) -> None:
        check_ranges(ranges, self.window_bytes)
        total = sum(len(r.local) for r in ranges)
        loop = asyncio.get_running_loop()
        sends = []
        for r in ranges:
            for offset, length in stripes(r.remote_offset, len(r.local), len(self.pool),
                                          MIN_STRIPE_BYTES):
                header = FrameHeader(self.grant.token, write_id, total, offset, length).pack()
                piece = r.local[offset - r.remote_offset:offset - r.remote_offset + length]
                connection = self.pool.next()
                sends.append(loop.run_in_executor(connection.executor, connection.send,
                                                  header, piece))
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise DataPlaneError(f"tcp data plane to {self.pool.address}: "
                                 f"{type(errors[0]).__name__}: {errors[0]}") from errors[0]


class _ConnectionPool:
    def __init__(self, host: str, port: int, count: int, plane: TcpSenderPlane):
        self.address = f"{host}:{port}"
        self.connections = [_Connection(host, port, plane) for _ in range(count)]
        self._next = itertools.cycle(self.connections)

    def __len__(self) -> int:
        return len(self.connections)

    def next(self) -> "_Connection":
        return next(self._next)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


class _Connection:
    """One socket and the one thread that writes to it (frames never interleave)."""

    def __init__(self, host: str, port: int, plane: TcpSenderPlane):
        self.host, self.port, self.plane = host, port, plane
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kv-dp-send")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, header: bytes, data: memoryview) -> None:
        """Executor thread: one frame; a failed send drops the socket (the next
        write reconnects)."""
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            try:
                if isinstance(self._sock, ssl.SSLSocket):
                    self._sock.sendall(header)
                    self._sock.sendall(data)
                else:
                    send_all(self._sock, [memoryview(header), data])
            except (OSError, ValueError):
                self._drop()
                raise

    def close(self) -> None:
        with self._lock:
            self._drop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.plane.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.plane.ssl_context is not None:
            sock = self.plane.ssl_context.wrap_socket(
                sock, server_hostname=self.plane.server_name or self.host)
        sock.settimeout(self.plane.timeout_s)
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


def send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """``sendall`` over several buffers with ``sendmsg`` (one syscall when it all fits)."""
    views = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def client_ssl_context(root_cert: str, client_cert: str = "",
                       client_key: str = "") -> ssl.SSLContext | None:
    """TLS toward receivers signed by ``root_cert`` (None: off), with a client
    certificate for mutual TLS."""
    if not root_cert:
        return None
    context = ssl.create_default_context(cafile=root_cert)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context
