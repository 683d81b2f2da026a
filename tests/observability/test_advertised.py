"""Addresses bound on a wildcard go out as this node's IP, so other nodes can reach them."""

from __future__ import annotations

import ipaddress

import pytest

from kvcluster.observability.metrics import advertised, advertised_zmq


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "*"])
def test_a_wildcard_bind_is_advertised_as_a_concrete_address(host):
    out = advertised_zmq(f"tcp://{host}:5557")
    assert out.startswith("tcp://") and out.endswith(":5557")
    ip = out.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    assert not ipaddress.ip_address(ip).is_unspecified
    assert advertised(f"{host}:9000").endswith(":9000")


def test_concrete_and_non_tcp_endpoints_are_unchanged():
    assert advertised_zmq("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"
    assert advertised_zmq("tcp://10.1.2.3:1") == "tcp://10.1.2.3:1"
    assert advertised_zmq("ipc:///tmp/kv-events") == "ipc:///tmp/kv-events"
    assert advertised_zmq("inproc://events") == "inproc://events"
