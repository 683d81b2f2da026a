"""Tiers as vLLM's KV events name them (``medium``), for both ends of that stream.

vLLM's own blocks are announced with medium "GPU" (also on a CPU engine: it is the
paged cache). kvcluster's connector announces its tiers with the media below and
``ownership`` "kvcluster" (its hashes are chunk keys, not vLLM block hashes).
"""

from __future__ import annotations

from kvcluster.common.events import Tier

MEDIUM_OF_TIER = {Tier.DEVICE: "GPU", Tier.HOST: "CPU", Tier.DISK: "STORAGE", Tier.REDIS: "REDIS"}
TIER_OF_MEDIUM = {medium: tier for tier, medium in MEDIUM_OF_TIER.items()}
KVCLUSTER_OWNERSHIP = "kvcluster"


def tier_of_medium(medium: str | None) -> Tier:
    """The tier of a vLLM event's ``medium``; None (older vLLM) is the paged cache.

    Raises:
        ValueError: a medium no tier maps to.
    """
    if medium is None:
        return Tier.DEVICE
    try:
        return TIER_OF_MEDIUM[medium.upper()]
    except KeyError:
        raise ValueError(f"unknown KV event medium {medium!r} "
                         f"(known: {sorted(TIER_OF_MEDIUM)})") from None
