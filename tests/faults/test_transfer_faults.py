"""Faults on the KV transfer path, between real worker processes.

A DecodeWorker process and PrefillWorker processes (the real classes, their
real gRPC transfer; :mod:`tests.faults.procs`), shared by the module. Where
network namespaces can be made, the decoder lives in one namespace and the
prefill workers in another, joined by a veth pair
(:class:`kvcluster.transfer.netns.NetnsPair`); elsewhere all run on 127.0.0.1
and the network-cut test skips. Senders are paced by a token bucket at
128 kbit/s (one 16 KiB chunk a second) so a fault lands mid-transfer.

1. network cut mid-transfer: ``tc netem loss 100%`` on the sender's veth where
   the kernel has netem, else the veth is set down (this machine has no netem:
   link down is what runs here); restored afterwards.
2. SIGKILL of the prefill process mid-transfer; a spare prefill process (started
   with the others) then transfers to the same decoder.

Both times the decoder must recompute what never arrived and answer with
exactly the greedy tokens, long before its 30 s KV wait, and the next transfer
must succeed.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

import pytest

from kvcluster.transfer.netns import NetnsPair, netns_available
from tests.faults.conftest import WorkerProc, reference_tokens
from tests.faults.procs import GREEDY, NEW_TOKENS, PROMPT
from tests.workers.conftest import tiny_config

AVAILABLE, WHY = netns_available()
RATE_BPS = 128_000


@dataclass
class Link:
    pair: NetnsPair | None
    decode: WorkerProc
    prefill: WorkerProc
    spare: WorkerProc
    address: str
    expected: list[int]


@pytest.fixture(scope="module")
def link(tiny_model):
    pair = NetnsPair(f"kvf{os.getpid() % 100000}", subnet="10.231.9").create() \
        if AVAILABLE else None
    config = tiny_config(tiny_model, transfer={
        "host": pair.addr_b if pair else "127.0.0.1", "chunk_timeout_s": 1.0,
        "timeout_s": 6.0, "max_inflight_chunks": 1})
    in_b = pair.exec_argv(pair.ns_b, []) if pair else []
    in_a = pair.exec_argv(pair.ns_a, []) if pair else []
    procs = [WorkerProc("decode", config, in_b), WorkerProc("prefill", config, in_a),
             WorkerProc("prefill", config, in_a)]
    try:
        address = procs[0].expect("address ", 90)
        for proc in procs[1:]:
            proc.expect("ready", 90)
        yield Link(pair, *procs, address, reference_tokens(config, PROMPT, GREEDY))
    finally:
        for proc in procs:
            proc.close()
        if pair:
            pair.destroy()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}")
def test_cut_link_receiver_times_out_recomputes_then_link_recovers(link):
    assert link.address.startswith(link.pair.addr_b + ":")
    link.decode.send("cut 30")
    link.prefill.send(f"cut {link.address} {RATE_BPS}")
    link.prefill.expect("acquire cut 2", 30)  # two chunks out, three to go
    how = _cut(link.pair)
    began = time.monotonic()
    first = link.decode.result(20)
    assert first["tokens"] == link.expected and len(first["tokens"]) == NEW_TOKENS
    assert first["kv_source"] in ("transfer", "recompute")
    assert 0.9 <= time.monotonic() - began < 12, how  # the 1 s silence timeout, not 30 s
    sent = link.prefill.result(20)  # the sender gives up at its 6 s deadline
    assert not sent["transfer_ok"] and sent["message"]
    _restore(link.pair, how)
    link.decode.send("after 30")
    link.prefill.send(f"after {link.address} 0")
    resent, second = link.prefill.result(40), link.decode.result(40)
    assert resent["transfer_ok"], resent["message"]
    assert second["kv_source"] == "transfer"
    assert second["tokens"] == link.expected


@pytest.mark.timeout(120)
def test_prefill_killed_mid_transfer_decoder_recomputes(link):
    link.decode.send("r1 30")
    link.prefill.send(f"r1 {link.address} {RATE_BPS}")
    link.prefill.expect("acquire r1 2", 30)
    began = time.monotonic()
    link.prefill.kill()
    first = link.decode.result(20)
    # Completed, correct, and long before the 30 s KV wait: the broken stream
    # was noticed (connection reset, or 1 s of silence), not waited out.
    assert first["tokens"] == link.expected
    assert first["kv_source"] in ("transfer", "recompute")
    assert time.monotonic() - began < 15
    # Heals by itself: another prefill process, same decoder.
    link.decode.send("r2 30")
    link.spare.send(f"r2 {link.address} 0")
    sent, second = link.spare.result(30), link.decode.result(30)
    assert sent["transfer_ok"], sent["message"]
    assert second["kv_source"] == "transfer"
    assert second["tokens"] == link.expected


def _cut(pair: NetnsPair) -> str:
    """Drop everything the sender sends: netem loss 100% where the kernel has netem,
    else the sender's link goes down. Returns how it was cut."""
    netem = subprocess.run(["tc", "-n", pair.ns_a, "qdisc", "replace", "dev", pair.dev_a,
                            "root", "netem", "loss", "100%"], capture_output=True)
    if netem.returncode == 0:
        return "netem"
    _ip(pair, "link", "set", pair.dev_a, "down")
    return "link-down"


def _restore(pair: NetnsPair, how: str) -> None:
    if how == "netem":
        subprocess.run(["tc", "-n", pair.ns_a, "qdisc", "del", "dev", pair.dev_a, "root"],
                       check=True, capture_output=True)
    else:
        _ip(pair, "link", "set", pair.dev_a, "up")


def _ip(pair: NetnsPair, *args: str) -> None:
    subprocess.run(["ip", "-n", pair.ns_a, *args], check=True, capture_output=True)
