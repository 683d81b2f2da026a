"""Which acks the sender times as bandwidth samples (no network: acks are fed in)."""

from __future__ import annotations

import pytest

from kvcluster.common.config import TransferConfig
from kvcluster.common.layout import KVLayout
from kvcluster.transfer import stream_writer
from kvcluster.transfer.bandwidth import BandwidthEstimator
from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.messages import ChunkAck, ReceiverInfo
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.source import ChunkSource
from kvcluster.transfer.stream_writer import StreamOptions, StreamWriter

LAYOUT = KVLayout(2, 2, 8, 4)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _acks(monkeypatch, decode_speeds):
    """Chunks of 16 tokens, 1 ms on the wire each, written as soon as the previous is acked."""
    clock = Clock()
    monkeypatch.setattr(stream_writer.time, "perf_counter", clock)
    levels = LevelSet({"L0": object()})
    source = ChunkSource(range(64), LAYOUT, levels, 16)
    estimator = BandwidthEstimator(min_probe_bytes=1)
    info = ReceiverInfo(levels=("L0",), decode_tokens_per_s=decode_speeds)
    writer = StreamWriter(None, "r", source, make_policy("L0", ["L0"]), estimator, info,
                          TransferConfig(), StreamOptions(1000.0))
    for index in range(4):
        writer.result.levels[index] = "L0"
        writer._first_write[index] = clock.now
        clock.now += 0.001
        writer._on_ack(ChunkAck(index, 0, 100_000))
    return estimator


def test_acks_paced_by_a_slow_decoder_are_not_bandwidth_samples(monkeypatch):
    # The receiver decodes 16 tokens in 16 ms: from chunk 2 on, the chunk before the one
    # being written still waits for the decoder, so the receiver may have stopped
    # reading and the ack would time the decoder.
    slow = _acks(monkeypatch, (("L0", 1000.0),))
    assert slow.num_samples == 2
    assert slow.bytes_per_s == pytest.approx(1e8)  # 100 kB per ms: the wire


def test_every_ack_is_a_sample_while_the_decoder_keeps_up(monkeypatch):
    assert _acks(monkeypatch, (("L0", 1e6),)).num_samples == 4  # 16 us per chunk
    assert _acks(monkeypatch, ()).num_samples == 4  # speed unknown: nothing to predict
