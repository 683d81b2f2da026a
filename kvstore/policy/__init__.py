"""Eviction policies behind one interface, chosen by name."""

from kvcluster.common.names import EVICTION_POLICIES, check_registry
from kvstore.policy.base import EvictionPolicy, IsPinned
from kvstore.policy.lru import LRUPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "s3fifo": S3FIFOPolicy}
check_registry("eviction policies", POLICIES, EVICTION_POLICIES)


def make_policy(name: str, capacity_entries: int) -> EvictionPolicy:
    """Build the policy called ``name`` ("lru" or "s3fifo")."""
    try:
        return POLICIES[name](capacity_entries)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r} (known: {sorted(POLICIES)})") from None


__all__ = ["EvictionPolicy", "IsPinned", "LRUPolicy", "S3FIFOPolicy", "POLICIES", "make_policy"]
