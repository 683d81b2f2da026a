"""Exact eviction orders of both policies, driven directly."""

import pytest

from kvstore.policy import LRUPolicy, S3FIFOPolicy, make_policy


def k(i: int) -> bytes:
    return bytes([i]) * 32


def names(keys):
    return [key[0] for key in keys]


def test_lru_order_follows_last_use():
    p = LRUPolicy(4)
    for i in (1, 2, 3, 4):
        p.insert(k(i))
    p.touch(k(2))
    p.touch(k(1))
    assert names(p.eviction_order()) == [3, 4, 2, 1]
    assert p.pop_victim(lambda _k: False) == k(3)
    assert p.pop_victim(lambda key: key == k(4)) == k(2)  # 4 pinned: skipped, kept
    assert names(p.eviction_order()) == [4, 1]


def test_lru_all_pinned_gives_none():
    p = LRUPolicy(2)
    p.insert(k(1))
    assert p.pop_victim(lambda _k: True) is None
    assert k(1) in p


def test_s3fifo_one_hit_wonders_leave_first_and_ghosts_return_to_main():
    p = S3FIFOPolicy(10)  # small queue target: 1 entry
    for i in range(1, 6):
        p.insert(k(i))
    p.touch(k(1))
    p.touch(k(3))
    # small = [1,2,3,4,5] >= target: 1 accessed -> main; 2 evicted (ghost).
    assert p.pop_victim(lambda _k: False) == k(2)
    # 3 accessed -> main; 4 evicted.
    assert p.pop_victim(lambda _k: False) == k(4)
    assert p.pop_victim(lambda _k: False) == k(5)
    # small empty -> main [1, 3], both frequency 0 after the move.
    assert names(p.eviction_order()) == [1, 3]
    p.insert(k(2))  # a ghost: straight into main, behind 1 and 3
    p.insert(k(7))  # new: small
    assert names(p.eviction_order()) == [7, 1, 3, 2]


def test_s3fifo_main_gives_second_chances():
    p = S3FIFOPolicy(10)
    for i in (1, 2, 3):
        p.insert(k(i))
        p.touch(k(i))
    p.insert(k(4))
    # small [1,2,3,4]: 1,2,3 move to main (freq 0), 4 evicted.
    assert p.pop_victim(lambda _k: False) == k(4)
    p.touch(k(1))
    p.touch(k(1))
    # main [1(f2),2,3]: 1 rotates (f1), 2 evicted; then 3; then 1 (after one more rotation).
    assert names(p.eviction_order()) == [2, 3, 1]


def test_s3fifo_pinned_are_skipped():
    p = S3FIFOPolicy(10)
    for i in (1, 2, 3):
        p.insert(k(i))
    assert p.pop_victim(lambda key: key in (k(1), k(2))) == k(3)
    assert p.pop_victim(lambda key: key in (k(1), k(2))) is None
    assert len(p) == 2


def test_factory_rejects_unknown():
    assert isinstance(make_policy("s3fifo", 4), S3FIFOPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("mru", 4)
