"""The adaptive policy over a real stream through the in-sender token bucket, and the
receiver's decode/wire overlap."""

from __future__ import annotations

import pytest

from kvcluster.transfer.bandwidth import BandwidthEstimator
from kvcluster.transfer.policy import make_policy
from kvcluster.transfer.sender import KVSender
from kvcluster.transfer.source import ChunkSource
from kvcluster.transfer.token_bucket import TokenBucketShaper
from tests.transfer.conftest import make_runner, prefill_kv, prompt, run, small_config
from tests.transfer.helpers import receiver_node

RATE_BPS = 2e6  # 250 kB/s


@pytest.fixture(scope="module")
def receiver_runner(tiny_dir):
    return make_runner(tiny_dir)


def _send_twice(policy_name, slo_ms, sender_runner, receiver_runner, levels):
    """Two requests on one link (the first one's first chunk is the probe)."""
    tokens = prompt(256, seed=11)  # 8 chunks of 32 tokens; lossless 16 KiB per chunk
    kv = prefill_kv(sender_runner, tokens)
    config = small_config(chunk_tokens=32, max_inflight_chunks=1)

    async def main():
        async with receiver_node(receiver_runner, levels, config) as node:
            policy = make_policy(policy_name, levels.names, bandwidth_safety=0.8)
            estimator = BandwidthEstimator(min_probe_bytes=1024)
            shaper = TokenBucketShaper(RATE_BPS, burst_bytes=4096)
            results = []
            async with KVSender(node.server.address, levels, config, policy=policy,
                                shaper=shaper, estimator=estimator) as sender:
                for n in range(2):
                    source = ChunkSource(tokens, receiver_runner.layout, levels, 32, kv=kv)
                    source.encode_all()
                    results.append(await sender.send(source, f"{policy_name}-{n}", slo_ms))
                    node.free(f"{policy_name}-{n}")
            return results, estimator.bytes_per_s

    return run(main())


def test_adaptive_meets_an_slo_that_lossless_misses(sender_runner, receiver_runner, layout,
                                                    levels):
    lossless_s = 8 * layout.bytes_per_chunk(32) / (RATE_BPS / 8)  # ~0.52 s on the wire
    slo_ms = 1000 * lossless_s * 0.6
    best, _ = _send_twice(levels.best, slo_ms, sender_runner, receiver_runner, levels)
    adaptive, bytes_per_s = _send_twice("adaptive", slo_ms, sender_runner, receiver_runner,
                                        levels)
    assert best[1].elapsed_s > slo_ms / 1000  # the baseline misses
    second = adaptive[1]
    assert second.status.ok and second.elapsed_s <= slo_ms / 1000
    assert set(second.levels) != {levels.best}  # it had to lower the level
    # the estimate is the shaped rate (within 35%: message overheads, timer noise)
    assert bytes_per_s == pytest.approx(RATE_BPS / 8, rel=0.35)


def test_generous_slo_keeps_the_best_level(sender_runner, receiver_runner, levels):
    adaptive, _ = _send_twice("adaptive", 20_000, sender_runner, receiver_runner, levels)
    assert adaptive[1].levels == [levels.best] * 8


def test_decode_overlaps_the_wire(sender_runner, receiver_runner, levels):
    """Chunk i is decoded while chunk i+1 is still arriving: only the last decode is exposed."""
    results, _ = _send_twice(levels.best, 20_000, sender_runner, receiver_runner, levels)
    status = results[1].status
    assert status.decode_total_s > 0
    assert status.decode_overlap_s / status.decode_total_s > 0.5
