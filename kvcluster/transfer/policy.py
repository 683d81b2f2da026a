"""Level selection: which codec level (or "text") each chunk is sent at.

Deciding is separate from doing: a policy sees a :class:`ChunkPlan` (sizes,
time left, bandwidth estimate, the receiver's recompute speed) and returns a
level name; the sender does the sending. Implementations:
:class:`~kvcluster.transfer.adaptive_policy.AdaptivePolicy` and
:class:`~kvcluster.transfer.fixed_policy.FixedLevelPolicy`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from kvcluster.common.names import TRANSFER_POLICIES, check_registry
from kvcluster.transfer.messages import TEXT_LEVEL


@dataclass(frozen=True)
class ChunkPlan:
    """What is known when chunk ``index`` is about to be sent."""

    index: int
    num_chunks: int
    num_tokens: int
    """Tokens in this chunk."""
    time_left_s: float
    """Until the request's SLO deadline (may be negative)."""
    bytes_by_level: Mapping[str, int]
    """Encoded size of this chunk per level (exact or estimated)."""
    bytes_per_s: float | None
    """Bandwidth to plan with (BandwidthEstimator.planning_bytes_per_s); None before the probe."""
    prefill_tokens_per_s: float
    """Receiver's recompute speed; 0: cannot recompute."""
    decode_tokens_per_s: Mapping[str, float] = field(default_factory=dict)
    """Receiver's measured decode speed per level (absent: not measured yet)."""
    tokens_after: int = 0
    """Tokens in the chunks after this one."""
    seconds_per_byte: Sequence[float] = ()
    """Recent per-chunk samples of the link (BandwidthEstimator.seconds_per_byte_samples);
    empty: only ``bytes_per_s`` is known."""

    @property
    def chunks_left(self) -> int:
        """This chunk and the ones after it."""
        return self.num_chunks - self.index


class LevelPolicy(abc.ABC):
    name: str

    @abc.abstractmethod
    def choose(self, plan: ChunkPlan) -> str:
        """The level name (or ``"text"``) to send chunk ``plan.index`` at."""


def make_policy(name: str, level_names: Sequence[str], probe_level: str | None = None,
                bandwidth_safety: float = 0.8, slo_risk: float | None = None) -> LevelPolicy:
    """Policy by name: ``adaptive``, ``recompute`` or a level name (always that level).

    ``lowest`` and ``best`` name the last and first of ``level_names``;
    ``slo_risk``: the adaptive policy's risk bound (None: its default).
    """
    from kvcluster.transfer.adaptive_policy import DEFAULT_SLO_RISK, AdaptivePolicy
    from kvcluster.transfer.fixed_policy import FixedLevelPolicy

    if name == "adaptive":
        return AdaptivePolicy(level_names, probe_level=probe_level,
                              bandwidth_safety=bandwidth_safety,
                              slo_risk=DEFAULT_SLO_RISK if slo_risk is None else slo_risk)
    alias = _ALIASES.get(name)
    level = alias(level_names) if alias is not None else name
    if level != TEXT_LEVEL and level not in level_names:
        raise ValueError(f"unknown policy {name!r}: use one of {list(TRANSFER_POLICIES)} "
                         f"or of {list(level_names)}")
    return FixedLevelPolicy(level)


_ALIASES: dict[str, Callable[[Sequence[str]], str]] = {
    "recompute": lambda names: TEXT_LEVEL,
    "lowest": lambda names: names[-1],
    "best": lambda names: names[0],
}
"""Fixed-level policies named for a place in the level list (best quality first)."""
check_registry("transfer policies", ("adaptive", *_ALIASES), TRANSFER_POLICIES)
