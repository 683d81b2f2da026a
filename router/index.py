"""The cluster KV index: which instances hold which block hashes, in which tier.

Built only from KV events (:mod:`kvcluster.common.events`). The router asks one
question of it: for a request's chain of 64-bit block hashes, how long is the
prefix each instance holds, and in which tiers.

Data structure (one dict, one big-int per block hash)::

    lanes[h] = | lane 3: held in any tier  | lane 2: tier <= DISK | lane 1: tier <= HOST | lane 0: DEVICE |
                 <-------- W bits -------->  ...                                          <-- W bits -->
    bit (lane * W + slot) = instance ``slot`` holds ``h`` in a tier at least that fast

A lookup ANDs the lanes of consecutive blocks into a running mask and stops
when it is zero; the position where an instance's bit drops out of lane k is
that instance's prefix length in tiers <= k. So one dict lookup and one AND
per block answers all instances and all tiers at once. Per-(slot, tier) sets
make removals and clears O(blocks of that instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from kvcluster.common.events import AllCleared, BlockRemoved, BlockStored, KVEvent, Tier

NUM_TIERS = len(Tier)


@dataclass(frozen=True)
class PrefixMatch:
    """Result of :meth:`KVIndex.match`: per-slot prefix lengths in blocks."""

    lane_lengths: list[int]
    """``lane_lengths[lane * width + slot]``: prefix blocks held in tiers <= lane."""
    width: int

    def matched_blocks(self, slot: int) -> int:
        """Longest prefix (blocks) instance ``slot`` holds in any tier."""
        return self.lane_lengths[(NUM_TIERS - 1) * self.width + slot]

    def tier_blocks(self, slot: int) -> tuple[int, ...]:
        """Blocks of the matched prefix counted per tier, fastest first.

        Block j counts in the fastest tier k such that blocks 0..j are all held in
        tiers <= k: exact when a faster tier holds the front of the prefix (what LRU
        keeps), pessimistic otherwise.
        """
        lens = self.lane_lengths
        out, prev = [], 0
        for lane in range(NUM_TIERS):
            cur = lens[lane * self.width + slot]
            out.append(cur - prev)
            prev = cur
        return tuple(out)


class KVIndex:
    """Block hash -> instances and tiers, with longest-prefix lookup.

    Instances are addressed by string id; each gets a slot (bit position) on
    first sight. ``max_instances`` fixes the lane width W.
    """

    def __init__(self, max_instances: int = 256):
        if max_instances <= 0:
            raise ValueError(f"max_instances must be positive, got {max_instances}")
        self.width = max_instances
        self._lanes: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._free_slots = list(range(max_instances - 1, -1, -1))
        self._held: dict[int, list[dict[int, None]]] = {}
        """slot -> per-tier hash sets, as dicts: the GC untracks dicts of ints, not sets."""
        self._store_mask = [[self._mask_from(s, t) for t in range(NUM_TIERS)]
                            for s in range(max_instances)]
        self._slot_all = [self._mask_from(s, 0) for s in range(max_instances)]

    # ------------------------------------------------------------ public API

    def slot(self, instance_id: str) -> int:
        """The instance's slot, allocated on first use."""
        slot = self._slots.get(instance_id)
        if slot is None:
            if not self._free_slots:
                raise ValueError(f"index full: more than {self.width} instances")
            slot = self._slots[instance_id] = self._free_slots.pop()
            self._held[slot] = [{} for _ in range(NUM_TIERS)]
        return slot

    def slot_of(self, instance_id: str) -> int | None:
        return self._slots.get(instance_id)

    def instance_ids(self) -> list[str]:
        return list(self._slots)

    def apply(self, instance_id: str, events: Iterable[KVEvent]) -> int:
        """Apply one instance's events in order. Returns block-level events applied."""
        slot = self.slot(instance_id)
        count = 0
        for event in events:
            if isinstance(event, BlockStored):
                self.store(slot, event.block_hashes, event.tier)
                count += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.remove(slot, event.block_hashes, event.tier)
                count += len(event.block_hashes)
            elif isinstance(event, AllCleared):
                self.clear(slot, event.tier)
                count += 1
            else:
                raise ValueError(f"unknown KV event {event!r}")
        return count

    def store(self, slot: int, block_hashes: Sequence[int], tier: Tier) -> None:
        held = self._held[slot][tier]
        mask = self._store_mask[slot][tier]
        lanes = self._lanes
        for h in block_hashes:
            if h not in held:
                held[h] = None
                lanes[h] = lanes.get(h, 0) | mask

    def remove(self, slot: int, block_hashes: Sequence[int], tier: Tier) -> None:
        held = self._held[slot]
        for h in block_hashes:
            if h in held[tier]:
                del held[tier][h]
                self._recompute(slot, h)

    def clear(self, slot: int, tier: Tier | None = None) -> None:
        """Drop what ``slot`` holds in ``tier`` (every tier when None)."""
        tiers = range(NUM_TIERS) if tier is None else (int(tier),)
        held = self._held[slot]
        for t in tiers:
            hashes, held[t] = held[t], {}
            for h in hashes:
                self._recompute(slot, h)

    def forget(self, instance_id: str) -> None:
        """Drop an instance entirely and free its slot."""
        slot = self._slots.pop(instance_id, None)
        if slot is None:
            return
        self.clear(slot)
        del self._held[slot]
        self._free_slots.append(slot)

    def num_blocks(self, instance_id: str | None = None) -> int:
        """Distinct hashes held (by one instance, or by anyone when None)."""
        if instance_id is None:
            return len(self._lanes)
        slot = self._slots.get(instance_id)
        if slot is None:
            return 0
        return len(set().union(*self._held[slot]))

    def blocks_of(self, instance_id: str, tier: Tier) -> set[int]:
        slot = self._slots.get(instance_id)
        return set() if slot is None else set(self._held[slot][tier])

    def slot_mask(self, slots: Iterable[int]) -> int:
        """The running-mask start value for candidate ``slots`` (all lanes)."""
        mask = 0
        for s in slots:
            mask |= self._slot_all[s]
        return mask

    def match(self, block_hashes: Sequence[int], candidates_mask: int) -> PrefixMatch:
        """Longest held prefix of ``block_hashes`` for each candidate slot, per tier lane.

        Args:
            block_hashes: the request's chained 64-bit hashes, in prefix order.
            candidates_mask: from :meth:`slot_mask`; other slots report 0.
        """
        width = self.width
        lens = [0] * (NUM_TIERS * width)
        run = candidates_mask
        get = self._lanes.get
        pos = 0
        for pos, h in enumerate(block_hashes):
            nxt = get(h, 0) & run
            if nxt != run:
                if pos:  # bits dropping at position 0 keep their initial 0
                    _record(lens, run ^ nxt, pos)
                run = nxt
                if not run:
                    break
        else:
            if run:
                _record(lens, run, len(block_hashes))
        return PrefixMatch(lens, width)

    # ------------------------------------------------------------ helpers

    def _mask_from(self, slot: int, tier: int) -> int:
        """Bits of ``slot`` in lanes tier..3: held in ``tier`` means held in tier <= k for k >= tier."""
        mask = 0
        for lane in range(tier, NUM_TIERS):
            mask |= 1 << (lane * self.width + slot)
        return mask

    def _recompute(self, slot: int, h: int) -> None:
        held = self._held[slot]
        value = self._lanes.get(h, 0) & ~self._slot_all[slot]
        for t in range(NUM_TIERS):
            if h in held[t]:
                value |= self._store_mask[slot][t]
                break
        if value:
            self._lanes[h] = value
        else:
            self._lanes.pop(h, None)


def _record(lens: list[int], bits: int, pos: int) -> None:
    while bits:
        low = bits & -bits
        lens[low.bit_length() - 1] = pos
        bits ^= low
