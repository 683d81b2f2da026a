"""The mooncake data plane: the Mooncake Transfer Engine moves the payloads.

Optional extra ``mooncake`` (``mooncake-transfer-engine`` on GPU nodes, the
``-non-cuda`` wheel elsewhere; it needs ``libibverbs1`` installed even for
TCP). Each end runs one engine per process with the P2P handshake (no etcd:
the receiver's session id, ``host:rpc_port``, travels in the grant). The
receiver registers its windows with its engine; the sender registers staging
buffers with its own, copies a chunk there and writes it one-sided with
``batch_transfer_sync_write`` into ``remote_address + offset``. The engine
picks RDMA / GPUDirect where ``transfer.mooncake_protocol`` says so and the
devices exist; on CPU boxes it is its TCP transport.

Like shm, writes are one-sided, so a window whose transfer did not end
cleanly is unregistered and dropped, never lent again (a late write then
fails in the engine instead of landing in another transfer's window).

Note: the engine's listeners bind every interface (its handshake and TCP
transport do not take a bind address), which is why the tests and
benchmarks run it only inside a private network namespace.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from kvcluster.transfer.data_plane.base import (
    DataLink, DataPlaneError, ReceiverPlane, SenderPlane, Window, WriteRange, check_range,
    check_ranges,
)
from kvcluster.transfer.data_plane.tcp import registered_buffer
from kvcluster.transfer.data_plane.window_pool import WindowPool
from kvcluster.transfer.messages import DataPlaneGrant, DataPlaneOffer, StreamHeader


def mooncake_unavailable() -> str:
    """Why the engine cannot run in this process; "" when it can."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as exc:
        return f"mooncake-transfer-engine cannot be imported: {exc}"
    return ""


class Engine:
    """One Transfer Engine and the memory registered with it."""

    def __init__(self, host: str, protocol: str, device: str):
        why = mooncake_unavailable()
        if why:
            raise DataPlaneError(why)
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
            raise DataPlaneError(f"mooncake engine failed to start ({host}, {protocol})")
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"
        self.lock = threading.Lock()

    def register(self, num_bytes: int) -> np.ndarray:
        buffer = registered_buffer(num_bytes)
        if self.engine.register_memory(buffer.ctypes.data, buffer.nbytes) != 0:
            raise DataPlaneError(f"mooncake refused to register {num_bytes} bytes")
        return buffer

    def unregister(self, buffer: np.ndarray) -> None:
        self.engine.unregister_memory(buffer.ctypes.data)


class MooncakeReceiverPlane(ReceiverPlane):
    name = "mooncake"

    def __init__(self, host: str, budget_bytes: int, protocol: str, device: str):
        self.host, self.protocol, self.device = host, protocol, device
        self.budget_bytes = budget_bytes
        self.engine: Engine | None = None
        self.pool: WindowPool | None = None
        self.why_not = mooncake_unavailable()

    async def start(self) -> None:
        if self.engine is None and not self.why_not:
            try:
                self.engine = Engine(self.host, self.protocol, self.device)
            except DataPlaneError as exc:
                self.why_not = str(exc)
                return
            self.pool = WindowPool(self.engine.register, self.engine.unregister, len,
                                   self.budget_bytes)

    async def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def unavailable(self, offer: DataPlaneOffer, node_id: str) -> str:
        return self.why_not if self.engine is None else ""

    def open(self, header: StreamHeader, window_bytes: int) -> Window | None:
        buffer = self.pool.take(window_bytes) if self.pool is not None else None
        if buffer is None:
            return None
        return MooncakeWindow(self.pool, buffer, DataPlaneGrant(
            "mooncake", b"", len(buffer), self.engine.session_id,
            remote_address=buffer.ctypes.data, reason=f"mooncake {self.protocol}"))

    def stats(self) -> dict:
        if self.engine is None:
            return {"unavailable": self.why_not}
        return {"session_id": self.engine.session_id,
                "registered_bytes": self.pool.registered_bytes}


class MooncakeWindow(Window):
    def __init__(self, pool: WindowPool, buffer: np.ndarray, grant: DataPlaneGrant):
        self.pool, self.buffer, self.grant = pool, buffer, grant

    @property
    def size(self) -> int:
        return len(self.buffer)

    def view(self, offset: int, length: int) -> memoryview:
        check_range(offset, length, self.size)
        return memoryview(self.buffer)[offset:offset + length]

    def close(self, clean: bool) -> None:
        self.pool.give(self.buffer, reuse=clean)


class MooncakeSenderPlane(SenderPlane):
    name = "mooncake"

    def __init__(self, host: str, protocol: str, device: str, staging_bytes: int):
        self.host, self.protocol, self.device = host, protocol, device
        self.staging_bytes = staging_bytes
        self.executor = ThreadPoolExecutor(2, thread_name_prefix="kv-dp-mooncake")
        self._engine: Engine | None = None
        self._staging: WindowPool | None = None

    def link(self, grant: DataPlaneGrant, target_host: str) -> DataLink:
        if self._engine is None:
            self._engine = Engine(self.host, self.protocol, self.device)
            self._staging = WindowPool(self._engine.register, self._engine.unregister, len,
                                       self.staging_bytes)
        return MooncakeLink(grant, self)

    async def close(self) -> None:
        if self._staging is not None:
            self._staging.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def write_sync(self, grant: DataPlaneGrant, ranges: Sequence[WriteRange]) -> None:
        """Executor thread: copy into registered staging memory, then one batch write."""
        total = sum(len(r.local) for r in ranges)
        staging = self._staging.take(total)
        if staging is None:
            raise DataPlaneError(f"no staging memory for {total} bytes")
        try:
            sources, targets, lengths, position = [], [], [], 0
            for r in ranges:
                n = len(r.local)
                np.copyto(staging[position:position + n], np.frombuffer(r.local, np.uint8))
                sources.append(staging.ctypes.data + position)
                targets.append(grant.remote_address + r.remote_offset)
                lengths.append(n)
                position += n
            status = self._engine.engine.batch_transfer_sync_write(
                grant.address, sources, targets, lengths)
        finally:
            self._staging.give(staging)
        if status != 0:
            raise DataPlaneError(f"mooncake write to {grant.address} failed ({status})")


class MooncakeLink(DataLink):
    def __init__(self, grant: DataPlaneGrant, plane: MooncakeSenderPlane):
        super().__init__(grant)
        self.plane = plane

    async def write(self, ranges: Sequence[WriteRange], write_id: int) -> None:
        check_ranges(ranges, self.window_bytes)
        await asyncio.get_running_loop().run_in_executor(self.plane.executor,
                                                         self.plane.write_sync, self.grant,
                                                         ranges)
