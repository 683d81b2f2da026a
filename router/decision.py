"""What goes into a routing decision and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Sequence

from kvcluster.common.events import HashSettings
from kvcluster.common.hashing import ExtraKeys, chunk_hashes
from router.index import NUM_TIERS, PrefixMatch
from router.load import InstanceLoad


@dataclass(frozen=True)
class RouteRequest:
    block_hashes: Sequence[int]
    """The prompt's chained 64-bit hashes, one per ``tokens_per_hash`` tokens, in order
    (``chunk_hashes(...)[i].u64``)."""
    num_tokens: int
    """Prompt length in tokens (>= len(block_hashes) * tokens_per_hash)."""
    request_id: str = ""

    @classmethod
    def from_tokens(cls, token_ids: Sequence[int], settings: HashSettings, extra: ExtraKeys,
                    request_id: str = "") -> "RouteRequest":
        """Hash a prompt the way workers announce it: the chained hash of every
        ``settings.tokens_per_hash`` tokens' last block (every block when it equals
        ``settings.block_size``)."""
        chain = chunk_hashes(token_ids, settings.block_size, settings.tokens_per_hash, extra)
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

    __slots__ = ("instance_ids", "loads", "slots", "tokens_per_hash", "memo", "match")

    def __init__(self, instance_ids: list[str], loads: list[InstanceLoad], slots: list[int],
                 tokens_per_hash: int, memo: dict | None = None,
                 match: PrefixMatch | None = None):
        self.instance_ids = instance_ids
        self.loads = loads
        self.slots = slots
        self.tokens_per_hash = tokens_per_hash
        self.memo = {} if memo is None else memo
        self.match = match

    def with_match(self, match: PrefixMatch) -> "Candidates":
        """The same candidates (sharing ``memo``) with one request's prefix match."""
        return Candidates(self.instance_ids, self.loads, self.slots, self.tokens_per_hash,
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
