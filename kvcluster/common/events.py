"""KV events: what workers tell the router about the blocks they hold.

The router's index is built only from these (Dynamo's Stored / Removed /
Cleared). Each batch carries the publishing instance, a per-instance sequence
number (so the router can detect a gap and ask for a resync) and the hash
configuration (so a worker hashing differently is caught, never silently
treated as an empty instance).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Union

from kvcluster.common.hashing import HASH_VERSION


class Tier(enum.IntEnum):
    """Storage tiers, fastest first."""

    DEVICE = 0
    HOST = 1
    DISK = 2
    REDIS = 3


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    """64-bit chained hashes, in prefix order."""
    tier: Tier
    parent_hash: int | None = None
    """64-bit hash of the block before the first one, None at the sequence start."""


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    tier: Tier


@dataclass(frozen=True)
class AllCleared:
    tier: Tier | None = None
    """None clears every tier."""


KVEvent = Union[BlockStored, BlockRemoved, AllCleared]


@dataclass(frozen=True)
class HashSettings:
    """What must agree between a worker and the router for hashes to match.

    Raises:
        ValueError: a block size that is not positive, or a ``tokens_per_hash``
            that is not a multiple of it.
    """

    model_id: str
    block_size: int
    """Tokens per hashed block: the step of the hash chain (engine.block_size)."""
    tokens_per_hash: int
    """Tokens one announced hash stands for. A kvstore announces one key per chunk
    (``store.chunk_tokens``: the chained hash of the chunk's last block); equal to
    ``block_size`` when every block is announced. 0: a batch from a worker older
    than this field, which matches no router."""
    hash_version: int = HASH_VERSION

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"HashSettings.block_size must be positive, got {self.block_size}")
        if self.tokens_per_hash < 0 or self.tokens_per_hash % self.block_size:
            raise ValueError(f"HashSettings.tokens_per_hash ({self.tokens_per_hash}) must be a "
                             f"multiple of block_size ({self.block_size})")

    def differences(self, other: "HashSettings") -> list[str]:
        """``"field mine vs theirs"`` for every field where ``other`` differs."""
        pairs = ((f.name, getattr(self, f.name), getattr(other, f.name))
                 for f in dataclasses.fields(self))
        return [f"{name} {mine!r} vs {theirs!r}" for name, mine, theirs in pairs if mine != theirs]


@dataclass
class KVEventBatch:
    instance_id: str
    seq: int
    """Per-instance sequence number, starting at 0, +1 per batch."""
    settings: HashSettings
    events: list[KVEvent] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "instance_id": self.instance_id,
                "seq": self.seq,
                "settings": _settings_to_list(self.settings),
                "events": [_event_to_list(e) for e in self.events],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "KVEventBatch":
        try:
            raw = json.loads(text)
            return cls(
                instance_id=str(raw["instance_id"]),
                seq=int(raw["seq"]),
                settings=_settings_from_list(raw["settings"]),
                events=[_event_from_list(e) for e in raw["events"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed KV event batch: {exc}") from exc


def _settings_to_list(settings: HashSettings) -> list:
    # tokens_per_hash last: the first three keep their places from before it existed.
    return [settings.model_id, settings.block_size, settings.hash_version,
            settings.tokens_per_hash]


def _settings_from_list(item: list) -> HashSettings:
    if not isinstance(item, list) or len(item) not in (3, 4):
        raise ValueError(f"settings must be [model_id, block_size, hash_version, "
                         f"tokens_per_hash], got {item!r}")
    model_id, block_size, version, *rest = item
    tokens_per_hash = int(rest[0]) if rest else 0  # 3 fields: an older worker announced none
    return HashSettings(str(model_id), int(block_size), tokens_per_hash, int(version))


def _event_to_list(event: KVEvent) -> list:
    if isinstance(event, BlockStored):
        return ["S", int(event.tier), list(event.block_hashes), event.parent_hash]
    if isinstance(event, BlockRemoved):
        return ["R", int(event.tier), list(event.block_hashes)]
    return ["C", None if event.tier is None else int(event.tier)]


def _event_from_list(item: list) -> KVEvent:
    kind = item[0]
    if kind == "S":
        return BlockStored(tuple(int(h) for h in item[2]), Tier(item[1]), item[3])
    if kind == "R":
        return BlockRemoved(tuple(int(h) for h in item[2]), Tier(item[1]))
    if kind == "C":
        return AllCleared(None if item[1] is None else Tier(item[1]))
    raise ValueError(f"unknown KV event kind {kind!r}")
