"""Which data plane a transfer uses: the sender offers, the receiver grants.

``transfer.data_plane`` on each end:

| setting  | sender offers            | receiver serves |
|----------|--------------------------|-----------------|
| auto     | shm, tcp, grpc           | shm, tcp        |
| tcp      | tcp, grpc                | tcp             |
| shm      | shm, grpc                | shm             |
| mooncake | mooncake, grpc           | mooncake        |
| grpc     | (no offer: inline)       | nothing         |

The receiver takes the first offered plane it serves that can reach the
sender (shm: the same node id on both ends) and has a window free; else
inline. "auto" therefore means shared memory on one node and our tcp channel
across nodes, which is what measured best on CPU (docs/benchmarks.md);
mooncake is chosen by name (its RDMA transports pay off on GPU nodes with
RDMA NICs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections import Counter

from kvcluster.common.config import TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer.data_plane.base import DataLink, DataPlaneError, ReceiverPlane, SenderPlane, Window
from kvcluster.transfer.data_plane.grpc_inline import inline_grant
from kvcluster.transfer.messages import INLINE_PLANE, DataPlaneGrant, DataPlaneOffer, StreamHeader

log = logging.getLogger(__name__)

DATA_PLANES = ("auto", "grpc", "tcp", "shm", "mooncake")
SENDER_OFFERS = {"auto": ("shm", "tcp", INLINE_PLANE), "grpc": (), "tcp": ("tcp", INLINE_PLANE),
                 "shm": ("shm", INLINE_PLANE), "mooncake": ("mooncake", INLINE_PLANE)}
RECEIVER_SERVES = {"auto": ("shm", "tcp"), "grpc": (), "tcp": ("tcp",), "shm": ("shm",),
                   "mooncake": ("mooncake",)}


def node_identity() -> str:
    """This process's node: the Ray node id inside Ray, else host, boot and network
    namespace (two namespaces on one host are two nodes to us, as in the tests and
    benchmarks that emulate a network between them)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return "ray:" + ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - a driver without a node: fall through
            pass
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        boot, netns = "", 0
    return f"host:{socket.gethostname()}/{boot}/{netns}"


class ReceiverDataPlanes:
    """The planes a receiver serves, and the choice per transfer."""

    def __init__(self, planes: dict[str, ReceiverPlane], config: TransferConfig,
                 node_id: str | None = None):
        self.planes, self.config = planes, config
        self.node_id = node_identity() if node_id is None else node_id
        self.grants: Counter[str] = Counter()

    async def start(self) -> None:
        """Start every plane, each with one window of the largest size registered: the
        first transfer would otherwise wait for its pages to be faulted in and zeroed."""
        for plane in self.planes.values():
            await plane.start()
            try:
                plane.warm(self.config.data_plane_window_bytes)
            except OSError as exc:  # e.g. a small /dev/shm: transfers go inline or elsewhere
                log.warning("%s data plane: no window registered ahead (%s)", plane.name, exc)

    async def stop(self) -> None:
        for plane in self.planes.values():
            await plane.stop()

    def open(self, header: StreamHeader, layout: KVLayout) -> tuple[DataPlaneGrant, Window | None]:
        """The grant for ``header``'s offer and the window lent (None: inline)."""
        offer = header.data_plane or DataPlaneOffer()
        reasons = []
        for name in offer.planes:
            if name == INLINE_PLANE:
                break
            plane = self.planes.get(name)
            why = "not served here" if plane is None else plane.unavailable(offer, self.node_id)
            window = None if why else plane.open(header, self.window_bytes(header, layout))
            if window is not None:
                self.grants[name] += 1
                reason = "; ".join([*reasons, window.grant.reason or name])
                return dataclasses.replace(window.grant, reason=reason), window
            reasons.append(f"{name}: {why or 'no window free'}")
        self.grants[INLINE_PLANE] += 1
        return inline_grant("; ".join(reasons) or "inline requested"), None

    def window_bytes(self, header: StreamHeader, layout: KVLayout) -> int:
        """Room for the chunks a transfer keeps here at once (in flight, waiting to be
        decoded, decoding), at their raw size, within ``data_plane_window_bytes``."""
        held = self.config.max_inflight_chunks + self.config.max_pending_chunks + 1
        raw = layout.bytes_per_chunk(max(1, min(header.chunk_tokens, header.num_tokens)))
        return min(self.config.data_plane_window_bytes, held * raw)

    def stats(self) -> dict:
        return {"data_plane": self.config.data_plane, "serves": sorted(self.planes),
                "grants": dict(self.grants),
                **{name: plane.stats() for name, plane in self.planes.items()}}


class SenderDataPlanes:
    """The planes a sender can write over (built on first use), and its offer."""

    def __init__(self, config: TransferConfig, security=None, node_id: str | None = None):
        self.config, self.security = config, security
        self.node_id = node_identity() if node_id is None else node_id
        self.offers = SENDER_OFFERS[config.data_plane]
        self._planes: dict[str, SenderPlane] = {}
        self.used: Counter[str] = Counter()

    def offer(self) -> DataPlaneOffer | None:
        """What goes in each header; None: inline only (no grant to wait for)."""
        return DataPlaneOffer(self.offers, self.node_id) if self.offers else None

    def link(self, grant: DataPlaneGrant, target_host: str) -> DataLink | None:
        """The link to ``grant``'s window; None: send inline (and why is logged)."""
        if grant.inline or grant.plane not in self.offers:
            self.used[INLINE_PLANE] += 1
            return None
        try:
            link = self._plane(grant.plane).link(grant, target_host)
        except DataPlaneError as exc:
            log.warning("data plane %s unusable, sending inline: %s", grant.plane, exc)
            self.used[INLINE_PLANE] += 1
            return None
        self.used[grant.plane] += 1
        return link

    async def close(self) -> None:
        for plane in self._planes.values():
            await plane.close()
        self._planes.clear()

    def stats(self) -> dict:
        return {"data_plane": self.config.data_plane, "transfers": dict(self.used)}

    def _plane(self, name: str) -> SenderPlane:
        if name not in self._planes:
            self._planes[name] = make_sender_plane(name, self.config, self.security)
        return self._planes[name]


def make_receiver_planes(config: TransferConfig, security=None,
                         node_id: str | None = None) -> ReceiverDataPlanes:
    """The planes ``config.data_plane`` serves; ``security``: the transfer server's
    ServerSecurity (its TLS certificate covers the tcp listener too)."""
    planes = {name: make_receiver_plane(name, config, security)
              for name in RECEIVER_SERVES[config.data_plane]}
    return ReceiverDataPlanes(planes, config, node_id)


def make_receiver_plane(name: str, config: TransferConfig, security=None) -> ReceiverPlane:
    budget = config.data_plane_buffer_bytes
    if name == "tcp":
        from kvcluster.transfer.data_plane.tcp import TcpReceiverPlane, server_ssl_context

        context = server_ssl_context(getattr(security, "tls_cert", ""),
                                     getattr(security, "tls_key", ""),
                                     getattr(security, "tls_client_ca", ""))
        return TcpReceiverPlane(config.host, config.data_plane_port, budget,
                                config.data_plane_connections, config.chunk_timeout_s, context)
    if name == "shm":
        from kvcluster.transfer.data_plane.shm import ShmReceiverPlane

        return ShmReceiverPlane(budget)
    if name == "mooncake":
        from kvcluster.transfer.data_plane.mooncake import MooncakeReceiverPlane

        return MooncakeReceiverPlane(config.host, budget, config.mooncake_protocol,
                                     config.mooncake_device)
    raise ValueError(f"unknown data plane {name!r}; known: {DATA_PLANES}")


def make_sender_plane(name: str, config: TransferConfig, security=None) -> SenderPlane:
    """``security``: the sender's ChannelSecurity (TLS toward the receiver)."""
    if name == "tcp":
        from kvcluster.transfer.data_plane.tcp_link import TcpSenderPlane, client_ssl_context

        context = client_ssl_context(getattr(security, "root_cert", ""),
                                     getattr(security, "client_cert", ""),
                                     getattr(security, "client_key", ""))
        return TcpSenderPlane(config.data_plane_connections, config.timeout_s, context,
                              getattr(security, "server_name", ""))
    if name == "shm":
        from kvcluster.transfer.data_plane.shm import ShmSenderPlane

        return ShmSenderPlane()
    if name == "mooncake":
        from kvcluster.transfer.data_plane.mooncake import MooncakeSenderPlane

        return MooncakeSenderPlane(config.host, config.mooncake_protocol,
                                   config.mooncake_device, config.data_plane_window_bytes * 2)
    raise ValueError(f"unknown data plane {name!r}; known: {DATA_PLANES}")
