"""The data plane's small parts: tcp frame headers (fuzzed), stripes, the sender's range
allocator, the receiver's window pool, the offer and the grant."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.common.config import ConfigError, TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer.data_plane import tcp_framing as framing
from kvcluster.transfer.data_plane.factory import ReceiverDataPlanes, SenderDataPlanes
from kvcluster.transfer.data_plane.ranges import RangeAllocator
from kvcluster.transfer.data_plane.window_pool import WindowPool
from kvcluster.transfer.messages import DataPlaneOffer, StreamHeader

TOKEN = b"\x11" * 16


@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=framing.HEADER_BYTES, max_size=framing.HEADER_BYTES))
def test_any_header_bytes_parse_or_raise_framing_error(data):
    try:
        header = framing.parse(data)
    except framing.FramingError:
        return
    assert header.pack() == data  # whatever parses is exactly what we would send


@settings(max_examples=200, deadline=None)
@given(write_id=st.integers(0, 2**64 - 1), write_length=st.integers(1, framing.MAX_WRITE_BYTES),
       offset=st.integers(0, framing.MAX_WRITE_BYTES), cut=st.floats(0.0001, 1.0),
       flip=st.integers(0, framing.HEADER_BYTES * 8 - 1))
def test_headers_round_trip_and_a_flipped_bit_never_passes_silently(write_id, write_length,
                                                                    offset, cut, flip):
    length = max(1, int(write_length * cut))
    header = framing.FrameHeader(TOKEN, write_id, write_length, offset, length)
    packed = header.pack()
    assert framing.parse(packed) == header
    damaged = bytearray(packed)
    damaged[flip // 8] ^= 1 << (flip % 8)
    try:
        other = framing.parse(bytes(damaged))
    except framing.FramingError:
        return
    assert other != header  # a changed header reads as a different one, never as this


@pytest.mark.parametrize("data", [
    b"", b"KVDP", b"\x00" * framing.HEADER_BYTES,
    struct.pack("<4sBBH16sQQQQ", b"KVDP", 2, 1, 0, TOKEN, 1, 10, 0, 10),   # version
    struct.pack("<4sBBH16sQQQQ", b"KVDP", 1, 7, 0, TOKEN, 1, 10, 0, 10),   # kind
    struct.pack("<4sBBH16sQQQQ", b"KVDP", 1, 1, 0, TOKEN, 1, 10, 0, 11),   # stripe > write
    struct.pack("<4sBBH16sQQQQ", b"KVDP", 1, 1, 0, TOKEN, 1, 0, 0, 0),     # empty write
    struct.pack("<4sBBH16sQQQQ", b"KVDP", 1, 1, 0, TOKEN, 1, 1 << 62, 0, 1),  # huge
])
def test_malformed_headers_are_refused(data):
    with pytest.raises(framing.FramingError):
        framing.parse(data)


@given(length=st.integers(1, 1 << 26), count=st.integers(1, 8),
       minimum=st.integers(1, 1 << 21), offset=st.integers(0, 1 << 30))
def test_stripes_cover_the_range_exactly(length, count, minimum, offset):
    pieces = framing.stripes(offset, length, count, minimum)
    assert 1 <= len(pieces) <= count
    assert pieces[0][0] == offset and sum(n for _, n in pieces) == length
    for (a, n), (b, _) in zip(pieces, pieces[1:]):
        assert a + n == b


def test_range_allocator_first_fit_and_out_of_order_frees():
    ranges = RangeAllocator(100)
    assert [ranges.allocate(30), ranges.allocate(30), ranges.allocate(30)] == [0, 30, 60]
    assert ranges.allocate(20) is None and not ranges.can_allocate(11)
    ranges.free(30)  # the middle one first (a re-sent chunk's range, say)
    assert ranges.allocate(20) == 30 and ranges.allocate(10) == 50
    ranges.free(0)
    ranges.free(0)  # a release after a nak of the same attempt: ignored
    assert ranges.used_bytes == 90 - 30 + 0 and ranges.allocate(30) == 0
    with pytest.raises(ValueError):
        ranges.allocate(101)


def test_window_pool_reuses_then_drops_to_stay_in_budget():
    made, dropped = [], []

    def make(n):
        made.append(n)
        return bytearray(n)

    pool = WindowPool(make, dropped.append, len, budget_bytes=3 * 4096)
    a = pool.take(100)  # rounded up to a page
    assert len(a) == 4096 and made == [4096]
    pool.give(a)
    assert pool.take(4000) is a and made == [4096]  # reused, not registered again
    b = pool.take(2 * 4096)
    assert pool.take(4096) is None  # 3 pages registered, none free
    pool.give(a)
    pool.give(b)
    c = pool.take(3 * 4096)  # drops the free ones to make room
    assert len(c) == 3 * 4096 and len(dropped) == 2 and pool.registered_bytes == 3 * 4096
    pool.give(c, reuse=False)  # a window a late write may still hit: never lent again
    assert pool.registered_bytes == 0 and dropped[-1] is c


def test_window_pool_warm_registers_one_window_the_first_transfer_reuses():
    made = []
    pool = WindowPool(lambda n: made.append(n) or bytearray(n), lambda b: None, len,
                      budget_bytes=4 * 4096)
    assert pool.warm(2 * 4096) and made == [2 * 4096] and pool.num_free == 1
    window = pool.take(3000)  # smaller: the warm window serves it, nothing new is made
    assert len(window) == 2 * 4096 and made == [2 * 4096]
    assert not pool.warm(8 * 4096)  # over the budget: nothing registered
    assert made == [2 * 4096]


class _Plane:
    name = "tcp"

    def __init__(self, window=True):
        self.window, self.asked = window, []

    def unavailable(self, offer, node_id):
        return ""

    def open(self, header, window_bytes):
        self.asked.append(window_bytes)
        return None


def _header(offer, chunk_tokens=16, num_tokens=64):
    return StreamHeader("r", "L1", -(-num_tokens // chunk_tokens), num_tokens,
                        tuple(range(num_tokens)), chunk_tokens, 0.0, offer)


def test_receiver_falls_back_inline_and_says_why():
    layout = KVLayout(2, 2, 8, 4, "float16")
    config = TransferConfig(max_inflight_chunks=2, max_pending_chunks=4)
    plane = _Plane()
    planes = ReceiverDataPlanes({"tcp": plane}, config, node_id="n1")
    grant, window = planes.open(_header(DataPlaneOffer(("shm", "tcp", "grpc"), "n2")), layout)
    assert window is None and grant.plane == "grpc" and grant.inline
    assert grant.reason == "shm: not served here; tcp: no window free"
    assert plane.asked == [7 * layout.bytes_per_chunk(16)]  # 2 in flight + 4 pending + 1
    grant, _ = planes.open(_header(None), layout)  # an old sender: no offer
    assert grant.plane == "grpc" and planes.grants == {"grpc": 2}


@pytest.mark.parametrize("mode, planes", [("auto", ("shm", "tcp", "grpc")), ("grpc", ()),
                                          ("tcp", ("tcp", "grpc"))])
def test_sender_offers_follow_the_setting(mode, planes):
    offer = SenderDataPlanes(TransferConfig(data_plane=mode), node_id="n").offer()
    assert (offer.planes if offer else ()) == planes


def test_unknown_data_plane_setting_is_refused():
    with pytest.raises(ConfigError):
        TransferConfig(data_plane="rdma").validate("transfer")
