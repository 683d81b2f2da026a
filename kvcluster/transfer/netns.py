"""Two network namespaces joined by a veth pair, for real bandwidth limits.

    namespace <prefix>a                 namespace <prefix>b
    +----------------------+            +----------------------+
    | veth <prefix>a       |<---------->| veth <prefix>b       |
    | 10.<x>.<y>.1/30      |            | 10.<x>.<y>.2/30      |
    | egress: tc tbf       |            |                      |
    +----------------------+            +----------------------+

Only addresses made here are used. Needs root (``ip netns add``); where that
fails, :func:`netns_available` says so and callers fall back to the
token-bucket shaper, labelled as such.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from kvcluster.transfer.tc_shaper import MAX_PACKET_BYTES, tbf_args


@dataclass
class NetnsPair:
    prefix: str
    """Short name prefix (namespace and veth names are prefix+"a"/"b"; <= 12 chars)."""
    subnet: str = "10.231.0"
    """First three octets of the /30 the pair uses."""

    @property
    def ns_a(self) -> str:
        return self.prefix + "a"

    @property
    def ns_b(self) -> str:
        return self.prefix + "b"

    @property
    def addr_a(self) -> str:
        return f"{self.subnet}.1"

    @property
    def addr_b(self) -> str:
        return f"{self.subnet}.2"

    @property
    def dev_a(self) -> str:
        return self.prefix + "a"

    def create(self, bits_per_s: float | None = None) -> "NetnsPair":
        """Make both namespaces, the veth pair and (optionally) the limit on a's egress."""
        self.destroy()
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
        _ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.prefix + "b")
        for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a),
                              (self.ns_b, self.prefix + "b", self.addr_b)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # Packets no longer than any tbf bucket (tc_shaper.tbf_args): with 64 KiB GSO
        # packets a rate drop could leave one stuck at the head of the queue for good.
        _ip("-n", self.ns_a, "link", "set", "dev", self.dev_a,
            "gso_max_size", str(MAX_PACKET_BYTES))
        if bits_per_s:
            self.set_rate(bits_per_s)
        return self

    def set_rate(self, bits_per_s: float) -> None:
        subprocess.run(["tc", "-n", self.ns_a, "qdisc", "replace", "dev", self.dev_a, "root",
                        *tbf_args(bits_per_s)], check=True, capture_output=True)

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def destroy(self) -> None:
        """Delete both namespaces (the veth pair goes with them). Idempotent."""
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "NetnsPair":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def netns_available() -> tuple[bool, str]:
    """Whether namespaces + veth + tc work here; the reason when not."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False, "needs Linux and root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return False, "iproute2 (ip, tc) not installed"
    probe = NetnsPair(f"kvp{os.getpid() % 100000}", subnet="10.231.255")
    try:
        probe.create(bits_per_s=1e8)
        return True, ""
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return False, f"{exc} {detail.decode(errors='replace').strip()}"
    finally:
        probe.destroy()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
