"""Level selection, the bandwidth estimate and the token bucket, with exact numbers."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvcluster.transfer.adaptive_policy import AdaptivePolicy
from kvcluster.transfer.bandwidth import BandwidthEstimator
from kvcluster.transfer.messages import TEXT_LEVEL
from kvcluster.transfer.policy import ChunkPlan, make_policy
from kvcluster.transfer.token_bucket import TokenBucketShaper

LEVELS = ["lossless", "int8", "L1", "L0"]
SIZES = {"lossless": 8_000_000, "int8": 4_000_000, "L1": 1_000_000, "L0": 500_000}


def plan(index=0, num_chunks=4, time_left_s=1.0, bytes_per_s=10e6, prefill=0.0, tokens=1000):
    return ChunkPlan(index, num_chunks, tokens, time_left_s, SIZES, bytes_per_s, prefill)


def test_adaptive_picks_the_best_level_that_fits_the_remaining_share():
    policy = AdaptivePolicy(LEVELS, bandwidth_safety=1.0)
    # 4 chunks left, 1 s left: 0.25 s each; 10 MB/s -> 2.5 MB fits: L1 (1 MB), not int8 (4 MB)
    assert policy.choose(plan()) == "L1"
    # last chunk with 1 s: 10 MB fits... lossless is 8 MB -> 0.8 s
    assert policy.choose(plan(index=3)) == "lossless"
    # exactly at the boundary: int8 4 MB at 10 MB/s = 0.4 s <= 0.4 s
    assert policy.choose(plan(index=3, time_left_s=0.4)) == "int8"
    assert policy.choose(plan(index=3, time_left_s=0.3999)) == "L1"


def test_a_level_that_decodes_too_slowly_is_skipped():
    policy = AdaptivePolicy(LEVELS, bandwidth_safety=1.0)
    base = dict(index=3, time_left_s=1.0)  # lossless: 0.8 s on the wire
    assert policy.choose(plan(**base)) == "lossless"
    slow = ChunkPlan(3, 4, 1000, 1.0, SIZES, 10e6, 0.0, {"lossless": 500.0, "int8": 2000.0})
    assert policy.choose(slow) == "int8"  # lossless decodes in 2 s, int8 in 0.5 s


def test_safety_factor_plans_with_less_bandwidth():
    assert AdaptivePolicy(LEVELS, bandwidth_safety=0.5).choose(plan(index=3)) == "int8"


def test_no_level_fits_send_text_only_when_recompute_is_faster():
    policy = AdaptivePolicy(LEVELS, bandwidth_safety=1.0)
    tight = dict(index=3, time_left_s=0.01, bytes_per_s=1e6)  # L0 needs 0.5 s
    assert policy.choose(plan(**tight, prefill=0.0)) == "L0"  # receiver cannot recompute
    assert policy.choose(plan(**tight, prefill=1000.0)) == "L0"  # recompute 1.0 s > 0.5 s
    assert policy.choose(plan(**tight, prefill=4000.0)) == TEXT_LEVEL  # 0.25 s < 0.5 s
    # past the deadline: still the cheaper of lowest level and recompute
    assert policy.choose(plan(index=3, time_left_s=-1, bytes_per_s=1e6, prefill=4000.0)) == TEXT_LEVEL


def test_probe_before_any_estimate():
    assert AdaptivePolicy(LEVELS).choose(plan(bytes_per_s=None)) == "L1"  # middle level
    assert AdaptivePolicy(LEVELS, probe_level="int8").choose(plan(bytes_per_s=None)) == "int8"


def test_make_policy_names():
    assert make_policy("lowest", LEVELS).choose(plan()) == "L0"
    assert make_policy("best", LEVELS).choose(plan()) == "lossless"
    assert make_policy("int8", LEVELS).choose(plan()) == "int8"
    assert make_policy("recompute", LEVELS).choose(plan()) == TEXT_LEVEL
    assert make_policy("adaptive", LEVELS).name == "adaptive"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("L9", LEVELS)


def test_bandwidth_probe_then_ewma_over_seconds_per_byte():
    est = BandwidthEstimator(alpha=0.5, min_probe_bytes=1000)
    assert est.bytes_per_s is None and not est.has_estimate
    est.observe(500, 1.0)  # too small to time: ignored
    assert est.bytes_per_s is None
    est.observe(1_000_000, 1.0)  # probe: 1 MB/s
    assert est.bytes_per_s == pytest.approx(1e6)
    est.observe(1_000_000, 0.1)  # 10 MB/s: the average of 1.0 and 0.1 us/B is 0.55 us/B
    assert est.bytes_per_s == pytest.approx(1 / 0.55e-6)
    assert est.seconds_for(2_000_000) == pytest.approx(1.1)
    with pytest.raises(RuntimeError):
        BandwidthEstimator().seconds_for(1)


def test_planning_quantile_over_a_window_of_samples():
    est = BandwidthEstimator(alpha=0.5, window=5, min_probe_bytes=1)
    assert est.planning_bytes_per_s(0.1) is None
    for rate in (10, 1, 7, 3, 5, 9):  # the window keeps the last five: 1, 7, 3, 5, 9
        est.observe(rate * 1000, 1.0)
    assert est.num_samples == 5
    assert est.planning_bytes_per_s(0.05) == 1000  # index int(0.05 * 4) = 0 of [1, 3, 5, 7, 9]
    assert est.planning_bytes_per_s(0.5) == 5000
    assert est.planning_bytes_per_s(0.0) == est.bytes_per_s  # q = 0: the moving average


def test_token_bucket_paces_to_its_rate_and_follows_rate_changes():
    async def send(shaper, total, step):
        began = time.perf_counter()
        for _ in range(total // step):
            await shaper.acquire(step)
        return time.perf_counter() - began

    shaper = TokenBucketShaper(8e6, burst_bytes=10_000)  # 1 MB/s
    took = asyncio.run(send(shaper, 300_000, 10_000))
    assert 0.25 < took < 0.45  # (300 kB - 10 kB burst) / 1 MB/s = 0.29 s
    shaper.set_rate(80e6)  # 10 MB/s
    took = asyncio.run(send(shaper, 300_000, 10_000))
    assert took < 0.1
    with pytest.raises(ValueError):
        shaper.set_rate(0)


def risk_plan(index, time_left_s, samples, sizes=SIZES, decode=None, num_chunks=4, tokens=1000):
    """A plan whose link has shown ``samples`` (seconds per byte), planning at their best."""
    return ChunkPlan(index, num_chunks, tokens, time_left_s, sizes, 1 / min(samples), 0.0,
                     decode or {}, tokens * (num_chunks - 1 - index), samples)


def test_risk_test_refuses_a_level_that_one_slow_draw_would_make_unrecoverable():
    # 99 fast samples (10 MB/s) and one slow (0.5 MB/s): 1 % of draws are slow.
    samples = (1e-7,) * 99 + (2e-6,)
    # Share test at 10 MB/s, 1.2 s for 4 chunks: 0.3 s each -> int8 (4 MB = 0.4 s) no, L1 yes.
    # L1 on a slow draw takes 2 s: more than the whole 1.2 s left, however small the rest.
    gamble = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=1.0)
    careful = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.005)
    assert gamble.choose(risk_plan(0, 1.2, samples)) == "L1"
    # L0 on the slow draw: 1 s, then 3 x 0.5 MB at 10 MB/s = 0.15 s: 1.15 s < 1.2 s: safe.
    assert careful.choose(risk_plan(0, 1.2, samples)) == "L0"
    # With L1, any slow draw among the four chunks misses (~8 % with the stand-in for
    # unseen draws): a 20 % bound accepts that, 5 % does not.
    assert AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.2).choose(
        risk_plan(0, 1.2, samples)) == "L1"
    assert AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.05).choose(
        risk_plan(0, 1.2, samples)) == "L0"


def test_risk_test_counts_the_later_chunks_at_the_lowest_level():
    samples = (1e-7,) * 99 + (2e-6,)
    careful = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.005)
    # Last chunk, 1.2 s: L1 is 2 s on the slow draw -> refused; L0 is 1 s -> fine.
    assert careful.choose(risk_plan(3, 1.2, samples)) == "L0"
    # With 4.1 s left the last chunk may be L1: 2 s on the slow draw, 4 s on the
    # stand-in for an unseen one (2 x the slowest) ...
    assert careful.choose(risk_plan(3, 4.1, samples)) == "L1"
    # ... but not when three L0 chunks must follow (0.15 s even when all are fast).
    assert careful.choose(risk_plan(0, 4.1, samples)) == "L0"


def test_risk_test_counts_decoding_when_the_decoder_is_the_bottleneck():
    samples = (1e-7,) * 100  # steady 10 MB/s: the wire alone is never a risk here
    decode = {"L1": 1000.0, "L0": 1000.0}  # 1000 tokens: 1 s of decode per chunk
    # 4 chunks take >= 4 s to decode one after the other, whatever their level.
    policy = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.01)
    share_only = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=1.0)
    decode = decode | {"int8": 1000.0, "lossless": 500.0}
    # Share test, 4.3 s / 4 chunks: int8 (0.4 s wire, 1 s decode) fits 1.075 s.
    assert share_only.choose(risk_plan(0, 4.3, samples, decode=decode)) == "int8"
    # But int8 arrives after 0.4 s, then four decodes of 1 s follow one another:
    # 4.4 s > 4.3 s. L1 arrives after 0.1 s: 4.1 s.
    assert policy.choose(risk_plan(0, 4.3, samples, decode=decode)) == "L1"
    assert policy.choose(risk_plan(0, 4.7, samples, decode=decode)) == "int8"


def test_a_young_estimator_is_cautious():
    # Ten steady samples say nothing about rare slow draws: the stand-in for an unseen
    # one (2 x the slowest, with probability 1 / 11) keeps the last chunk from a level
    # that would only just fit at the seen rate.
    few = (1e-7,) * 10
    policy = AdaptivePolicy(LEVELS, bandwidth_safety=1.0, slo_risk=0.05)
    assert policy.choose(risk_plan(3, 0.5, few)) == "L1"  # int8: 0.4 s seen, 0.8 s unseen
    many = (1e-7,) * 100
    assert policy.choose(risk_plan(3, 0.5, many)) == "int8"  # unseen draw: 1 / 101 < 5 %


def test_estimator_keeps_a_longer_history_for_the_risk_test():
    est = BandwidthEstimator(window=4, history=6, min_probe_bytes=1)
    for n in range(1, 9):
        est.observe(1000, n / 1000)  # seconds per byte n * 1e-6
    assert est.num_samples == 4
    assert est.seconds_per_byte_samples() == pytest.approx([n * 1e-6 for n in range(3, 9)])
