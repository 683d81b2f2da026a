"""The mooncake data plane end to end (Mooncake Transfer Engine, its TCP transport here).

Runs in a subprocess inside a private network namespace: the engine's handshake and
TCP listeners bind every interface and take no bind address, and servers started by
tests may listen on loopback only. Skipped, with the reason, where the engine cannot
be imported (the optional ``mooncake`` extra and ``libibverbs1``) or namespaces cannot
be made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcluster.transfer.data_plane.mooncake import mooncake_unavailable
from kvcluster.transfer.netns import netns_available

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHY_NOT = mooncake_unavailable()
NETNS, WHY_NO_NETNS = netns_available()


@pytest.mark.timeout(120)
@pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)
@pytest.mark.skipif(not NETNS, reason="mooncake binds every interface; it runs only in a "
                                      f"private network namespace: {WHY_NO_NETNS}")
def test_mooncake_plane_moves_bit_exact_kv(tiny_dir):
    namespace = f"kvmc{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-m",
                               "tests.transfer.mooncake_proc", str(tiny_dir)],
                              cwd=REPO, capture_output=True, text=True, timeout=100)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("result ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[0].split(" ", 1)[1])
    assert result["data_plane"] == "mooncake" and result["code"] == "OK", result
    assert result["data_plane_bytes"] == result["bytes"] > 0
    assert result["kv_exact"]
