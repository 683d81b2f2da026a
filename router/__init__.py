"""KV-aware router: decides which instance serves a request; never moves KV.

Pure Python: imports only :mod:`kvcluster.common` (never torch).
"""

from router.decision import Candidates, RouteDecision, RouteRequest
from router.event_bus import EventBus, is_reset, make_event_bus
from router.heartbeat import Heartbeater
from router.index import KVIndex, PrefixMatch
from router.ingestor import EventIngestor
from router.kv_view import InstanceView, ViewState
from router.load import InstanceInfo, InstanceLoad
from router.local_bus import InProcessEventBus
from router.policies import POLICIES, RoutingPolicy, make_policy
from router.publisher import KVEventPublisher
from router.registry import InMemoryRegistry, InstanceRegistry
from router.router import NoInstanceError, Router, build_router

__all__ = [
    "Candidates", "EventBus", "EventIngestor", "Heartbeater", "InMemoryRegistry", "InProcessEventBus",
    "InstanceInfo", "InstanceLoad", "InstanceRegistry", "InstanceView", "KVEventPublisher",
    "KVIndex", "NoInstanceError", "POLICIES", "PrefixMatch", "RouteDecision", "RouteRequest",
    "Router", "RoutingPolicy", "ViewState", "build_router", "is_reset", "make_event_bus",
    "make_policy",
]
