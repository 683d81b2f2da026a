"""Routing policies: one base class, one file each, a factory by name."""

from __future__ import annotations

from typing import Callable

from kvcluster.common.config import RouterConfig
from kvcluster.common.names import ROUTING_POLICIES, check_registry
from router.policies.base import RoutingPolicy
from router.policies.kv_aware import KVAwarePolicy
from router.policies.least_loaded import LeastLoadedPolicy
from router.policies.prefix_only import PrefixOnlyPolicy
from router.policies.round_robin import RoundRobinPolicy

_FACTORIES: dict[str, Callable[[RouterConfig], RoutingPolicy]] = {
    "kv_aware": KVAwarePolicy,
    "round_robin": lambda _: RoundRobinPolicy(),
    "least_loaded": lambda _: LeastLoadedPolicy(),
    "prefix_only": lambda _: PrefixOnlyPolicy(),
}
check_registry("routing policies", _FACTORIES, ROUTING_POLICIES)
POLICIES = ROUTING_POLICIES


def make_policy(config: RouterConfig) -> RoutingPolicy:
    """The policy named by ``config.policy``."""
    factory = _FACTORIES.get(config.policy)
    if factory is None:
        raise ValueError(f"unknown routing policy {config.policy!r} (known: {list(POLICIES)})")
    return factory(config)


__all__ = ["KVAwarePolicy", "LeastLoadedPolicy", "POLICIES", "PrefixOnlyPolicy",
           "RoundRobinPolicy", "RoutingPolicy", "make_policy"]
