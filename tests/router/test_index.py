from kvcluster.common.events import AllCleared, BlockRemoved, BlockStored, Tier
from router.index import KVIndex


def _lookup(index: KVIndex, chain, ids):
    slots = {i: index.slot(i) for i in ids}
    match = index.match(chain, index.slot_mask(slots.values()))
    return {i: match.matched_blocks(s) for i, s in slots.items()}, match, slots


def test_longest_prefix_per_instance():
    index = KVIndex(max_instances=8)
    index.apply("a", [BlockStored((1, 2, 3, 4), Tier.DEVICE)])
    index.apply("b", [BlockStored((1, 2), Tier.DEVICE), BlockStored((9,), Tier.DEVICE)])
    index.apply("c", [BlockStored((2, 3, 4), Tier.DEVICE)])  # no block 1: no prefix
    lens, _, _ = _lookup(index, [1, 2, 3, 4, 5], ["a", "b", "c"])
    assert lens == {"a": 4, "b": 2, "c": 0}
    lens, _, _ = _lookup(index, [1, 2], ["a", "b", "c"])
    assert lens == {"a": 2, "b": 2, "c": 0}
    assert index.num_blocks() == 5 and index.num_blocks("b") == 3


def test_removed_block_cuts_the_prefix():
    index = KVIndex(max_instances=4)
    index.apply("a", [BlockStored((1, 2, 3, 4), Tier.DEVICE), BlockRemoved((3,), Tier.DEVICE)])
    lens, _, _ = _lookup(index, [1, 2, 3, 4], ["a"])
    assert lens == {"a": 2}
    assert index.num_blocks() == 3


def test_tiers_are_lanes_and_tier_blocks_counts_fastest_prefix():
    index = KVIndex(max_instances=4)
    index.apply("a", [BlockStored((1, 2), Tier.DEVICE), BlockStored((3,), Tier.HOST),
                      BlockStored((4, 5), Tier.DISK)])
    _, match, slots = _lookup(index, [1, 2, 3, 4, 5, 6], ["a"])
    assert match.matched_blocks(slots["a"]) == 5
    assert match.tier_blocks(slots["a"]) == (2, 1, 2, 0)
    # a host block in front of device blocks makes the device ones count as host
    index.apply("b", [BlockStored((1,), Tier.HOST), BlockStored((2, 3), Tier.DEVICE)])
    _, match, slots = _lookup(index, [1, 2, 3], ["b"])
    assert match.tier_blocks(slots["b"]) == (0, 3, 0, 0)


def test_block_in_two_tiers_survives_removal_from_one():
    index = KVIndex(max_instances=4)
    index.apply("a", [BlockStored((1, 2), Tier.DEVICE), BlockStored((1, 2), Tier.HOST),
                      BlockRemoved((1, 2), Tier.DEVICE)])
    _, match, slots = _lookup(index, [1, 2], ["a"])
    assert match.tier_blocks(slots["a"]) == (0, 2, 0, 0)
    index.apply("a", [BlockRemoved((2,), Tier.HOST)])
    assert _lookup(index, [1, 2], ["a"])[0] == {"a": 1}


def test_all_cleared_one_tier_or_every_tier():
    index = KVIndex(max_instances=4)
    index.apply("a", [BlockStored((1,), Tier.DEVICE), BlockStored((2,), Tier.HOST)])
    index.apply("b", [BlockStored((1, 2), Tier.DEVICE)])
    index.apply("a", [AllCleared(Tier.HOST)])
    assert _lookup(index, [1, 2], ["a", "b"])[0] == {"a": 1, "b": 2}
    index.apply("a", [AllCleared(None)])
    assert _lookup(index, [1, 2], ["a", "b"])[0] == {"a": 0, "b": 2}
    assert index.num_blocks("a") == 0 and index.num_blocks() == 2


def test_candidates_mask_and_forget_frees_a_clean_slot():
    index = KVIndex(max_instances=2)
    index.apply("a", [BlockStored((1, 2), Tier.DEVICE)])
    index.apply("b", [BlockStored((1,), Tier.DEVICE)])
    only_b = index.match([1, 2], index.slot_mask([index.slot("b")]))
    assert only_b.matched_blocks(index.slot("a")) == 0
    assert only_b.matched_blocks(index.slot("b")) == 1
    slot_a = index.slot("a")
    index.forget("a")
    assert index.slot("c") == slot_a  # reused, and holds nothing
    assert _lookup(index, [1, 2], ["c", "b"])[0] == {"c": 0, "b": 1}
    assert index.num_blocks() == 1


def test_full_index_refuses_new_instance():
    index = KVIndex(max_instances=1)
    index.slot("a")
    try:
        index.slot("b")
    except ValueError as exc:
        assert "index full" in str(exc)
    else:
        raise AssertionError("expected ValueError")
