"""What goes into a routing decision and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Sequence

from kvcluster.common.hashing import ExtraKeys, chunk_hashes, hash_blocks
from router.index import NUM_TIERS, PrefixMatch
from router.load import InstanceLoad


@dataclass(frozen=True)
class RouteRequest:
    block_hashes: Sequence[int]
    """The prompt's chained 64-bit block hashes (``hash_blocks(...)[i].u64``), in order."""
    num_tokens: int
    """Prompt length in tokens (>= len(block_hashes) * block_size)."""
    request_id: str = ""

    @classmethod
    def from_tokens(cls, token_ids: Sequence[int], block_size: int, extra: ExtraKeys,
                    request_id: str = "", chunk_tokens: int | None = None) -> "RouteRequest":
        """Hash a prompt the way workers announce it.

        Args:
            block_size: the engine's block size (the hash chain's step).
            chunk_tokens: when workers announce one key per chunk (the kvstore),
                the chunk size: keys are then the chained hash of each chunk's last block.
        """
        if chunk_tokens and chunk_tokens != block_size:
            chain = chunk_hashes(token_ids, block_size, chunk_tokens, extra)
        else:
            chain = hash_blocks(token_ids, block_size, extra)
        return cls(tuple(h.u64 for h in chain), len(token_ids), request_id)


@dataclass
class RouteDecision:
    instance_ids: list[str]
    """Chosen instance first, then the next best (fallbacks), best first."""
    matched_blocks: int
    """Prefix blocks the chosen instance holds (any tier)."""
    matched_tokens: int
    reason: str
    policy: str
    excluded: dict[str, str] = field(default_factory=dict)
    """Live instances left out of scoring, with why (silent, hash mismatch, resyncing)."""

    @property
    def instance_id(self) -> str:
        return self.instance_ids[0]


class Candidates:
    """The routable instances for one decision, and their prefix matches.

    ``instance_ids``, ``loads`` and ``slots`` are parallel lists that the router
    reuses across decisions while membership and loads are unchanged; ``memo``
    lives as long as they do (policies cache per-instance terms in it).
    """

    __slots__ = ("instance_ids", "loads", "slots", "block_size", "memo", "match")

    def __init__(self, instance_ids: list[str], loads: list[InstanceLoad], slots: list[int],
                 block_size: int, memo: dict | None = None, match: PrefixMatch | None = None):
        self.instance_ids = instance_ids
        self.loads = loads
        self.slots = slots
        self.block_size = block_size
        self.memo = {} if memo is None else memo
        self.match = match

    def with_match(self, match: PrefixMatch) -> "Candidates":
        """The same candidates (sharing ``memo``) with one request's prefix match."""
        return Candidates(self.instance_ids, self.loads, self.slots, self.block_size,
                          self.memo, match)

    def __len__(self) -> int:
        return len(self.instance_ids)

    def matched_blocks(self) -> list[int]:
        """Longest held prefix (blocks, any tier) per candidate."""
        if self.match is None or not self.slots:
            return [0] * len(self.slots)
        pick = self.memo.get("_pick_matched")
        if pick is None:
            off = (NUM_TIERS - 1) * self.match.width
            pick = self.memo["_pick_matched"] = itemgetter(*[off + s for s in self.slots])
        if len(self.slots) == 1:
            return [pick(self.match.lane_lengths)]
        return list(pick(self.match.lane_lengths))

    def tier_blocks(self, i: int) -> tuple[int, ...]:
        """Matched blocks of candidate ``i`` per tier, fastest first."""
        return self.match.tier_blocks(self.slots[i])
