"""Level sizes the policy plans with come from measurements, not constants."""

from __future__ import annotations

from kvcluster.transfer.levels import LevelSet
from kvcluster.transfer.source import ChunkSource
from kvstore.codec.factory import level_set
from tests.transfer.conftest import prefill_kv, prompt


def test_sizes_are_measured_once_then_estimated_for_every_request(sender_runner):
    levels = level_set(["int8", "L0", "L6"])
    tokens = prompt(64, seed=3)
    kv = prefill_kv(sender_runner, tokens)
    first = ChunkSource(tokens, sender_runner.layout, levels, 16, kv=kv)
    raw = sender_runner.layout.bytes_per_chunk(16)
    # Nothing measured yet: the estimate is the raw size until the sender measures.
    assert first.unmeasured_levels(1) == levels.names
    assert set(first.bytes_by_level(1).values()) == {raw}
    first.measure_sizes(1)  # encodes the chunk (exact, kept for sending)
    assert first.unmeasured_levels(1) == [] and first.unmeasured_levels(2) == []
    sizes = first.bytes_by_level(1)
    assert all(first.has_payload(1, level) for level in levels.names)
    assert sizes == {level: len(first.payload(1, level)) for level in levels.names}
    assert sizes["L6"] < sizes["L0"] < sizes["int8"] < raw  # not the raw-size guess
    # A later request starts from what the codec measured: no encoding to estimate.
    second = ChunkSource(tokens, sender_runner.layout, levels, 16, kv=kv)
    estimate = second.bytes_by_level(2)
    assert not any(second.has_payload(2, level) for level in levels.names)
    for level in levels.names:
        actual = len(second.payload(2, level))
        assert abs(estimate[level] - actual) <= 0.25 * actual
    assert estimate["L6"] < estimate["L0"] < estimate["int8"]


def test_level_set_averages_bytes_per_token_and_ignores_unknown_levels():
    levels = LevelSet({"a": object(), "b": object()})
    assert levels.bytes_per_token("a") is None
    levels.observe_size("a", 10, 1000)  # 100 B/token
    assert levels.bytes_per_token("a") == 100
    levels.observe_size("a", 10, 2000)  # 200: the average moves a fifth of the way
    assert levels.bytes_per_token("a") == 120
    levels.observe_size("zzz", 10, 1000)
    assert levels.bytes_per_token("zzz") is None and levels.bytes_per_token("b") is None
