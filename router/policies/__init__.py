"""Routing policies: one base class, one file each, a factory by name."""

from __future__ import annotations

from kvcluster.common.config import RouterConfig
from router.policies.base import RoutingPolicy
from router.policies.kv_aware import KVAwarePolicy
from router.policies.least_loaded import LeastLoadedPolicy
from router.policies.prefix_only import PrefixOnlyPolicy
from router.policies.round_robin import RoundRobinPolicy

POLICIES = ("kv_aware", "round_robin", "least_loaded", "prefix_only")


def make_policy(config: RouterConfig) -> RoutingPolicy:
    """The policy named by ``config.policy``."""
    if config.policy == "kv_aware":
        return KVAwarePolicy(config)
    if config.policy == "round_robin":
        return RoundRobinPolicy()
    if config.policy == "least_loaded":
        return LeastLoadedPolicy()
    if config.policy == "prefix_only":
        return PrefixOnlyPolicy()
    raise ValueError(f"unknown routing policy {config.policy!r} (known: {list(POLICIES)})")


__all__ = ["KVAwarePolicy", "LeastLoadedPolicy", "POLICIES", "PrefixOnlyPolicy",
           "RoundRobinPolicy", "RoutingPolicy", "make_policy"]
