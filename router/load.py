"""What an instance reports about itself in each heartbeat."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class InstanceLoad:
    queued_prefill_tokens: int = 0
    """Prompt tokens waiting for (or in) prefill on this instance."""
    active_decode_requests: int = 0
    kv_used_bytes: int = 0
    kv_capacity_bytes: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV memory in use, 0 when the capacity is unknown."""
        if self.kv_capacity_bytes <= 0:
            return 0.0
        return min(1.0, self.kv_used_bytes / self.kv_capacity_bytes)


@dataclass(frozen=True)
class InstanceInfo:
    """One registered instance as the registry last heard from it."""

    instance_id: str
    address: str = ""
    """Where its serving endpoint listens (host:port), for the front end."""
    role: str = "both"
    """prefill, decode or both."""
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    load: InstanceLoad = field(default_factory=InstanceLoad)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "InstanceInfo":
        raw = json.loads(text)
        raw["load"] = InstanceLoad(**raw.get("load", {}))
        return cls(**raw)
