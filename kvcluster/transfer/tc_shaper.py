"""A real bandwidth limit: ``tc tbf`` on a veth, changed with ``tc qdisc change``.

The first rate is set synchronously (so a bad device fails loudly); later
changes go to one long-running ``tc -batch -`` process, which applies each
line as it arrives: a change costs far less of the sender's time than a process
start (docs/transfer.md, "Network conditions"), so per-chunk rate changes stay
out of the measured transfer times. Runs in the caller's network namespace unless ``netns`` is
given, so a sender started inside namespace A shapes its own egress.
"""

from __future__ import annotations

import subprocess

from kvcluster.transfer.shaper import Shaper

MAX_PACKET_BYTES = 32 << 10
"""Largest packet (GSO super-packet) the shaped device may queue; ``NetnsPair`` caps
the veth's ``gso_max_size`` at this. tbf never sends a queued packet longer than its
bucket, so every burst must hold one: see :func:`tbf_args`."""


class TcShaper(Shaper):
    label = "tc tbf on a veth between two network namespaces"

    def __init__(self, device: str, bits_per_s: float, netns: str = ""):
        """
        Args:
            device: the interface to shape (egress).
            netns: run tc in this namespace (``tc -n``); empty: the caller's.
        """
        self.device = device
        self.prefix = ["tc", *(["-n", netns] if netns else [])]
        _check_rate(bits_per_s)
        subprocess.run([*self.prefix, *self.change_args(bits_per_s, "replace")], check=True,
                       capture_output=True)
        self.bits_per_s = bits_per_s
        self._batch: subprocess.Popen | None = None

    def set_rate(self, bits_per_s: float) -> None:
        _check_rate(bits_per_s)
        if bits_per_s == self.bits_per_s:
            return
        if self._batch is None:
            self._batch = subprocess.Popen([*self.prefix, "-force", "-batch", "-"],
                                           stdin=subprocess.PIPE, text=True)
        assert self._batch.stdin is not None
        self._batch.stdin.write(" ".join(self.change_args(bits_per_s)) + "\n")
        self._batch.stdin.flush()
        self.bits_per_s = bits_per_s

    async def acquire(self, num_bytes: int) -> None:
        pass  # the kernel paces

    def change_args(self, bits_per_s: float, verb: str = "change") -> list[str]:
        """``change`` keeps the qdisc and its queue; ``replace`` would drop queued
        packets, costing TCP a retransmission timeout (>= 200 ms) per rate change."""
        return ["qdisc", verb, "dev", self.device, "root", *tbf_args(bits_per_s)]

    def close(self) -> None:
        if self._batch is not None and self._batch.stdin is not None:
            self._batch.stdin.close()
            self._batch.wait(timeout=5)
            self._batch = None


def tbf_args(bits_per_s: float) -> list[str]:
    """tbf with a burst of ~2 ms of traffic (at least 64 KiB) and 50 ms of queue.

    The floor matters after a rate *drop*: tbf splits an oversized GSO packet only
    when it is enqueued, so a packet queued under a faster rate (bigger bucket) that
    is longer than the new bucket never earns enough tokens and blocks the queue
    (TCP's retransmissions wait behind it) until the next change. 64 KiB is twice
    ``MAX_PACKET_BYTES`` (32 KiB of payload + ~1.4 KiB of per-segment headers).
    """
    burst = max(2 * MAX_PACKET_BYTES, int(bits_per_s / 8 * 0.002))
    return ["tbf", "rate", f"{int(bits_per_s)}bit", "burst", str(burst), "latency", "50ms"]


def _check_rate(bits_per_s: float) -> None:
    if bits_per_s <= 0:
        raise ValueError(f"rate must be positive, got {bits_per_s}")
