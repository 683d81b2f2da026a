"""Small, explicit messages between the front end and the workers (pure Python).

Only these cross process boundaries on the control plane (Ray); KV bytes go
over the gRPC transfer, never through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcluster.common.sampling import SamplingParams


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    token_ids: tuple[int, ...]
    tenant: str = ""
    decode_target: str = ""
    """host:port of the decode worker's KV receiver; "" keeps the KV local."""
    slo_ms: float = 0.0
    """Transfer budget; 0 uses the configured SLO."""


@dataclass
class PrefillResult:
    request_id: str
    num_prompt_tokens: int
    num_transferred_tokens: int
    """Chunk-aligned prompt tokens whose KV was sent (the rest the decoder computes)."""
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    num_computed_tokens: int = 0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    wire_bytes: int = 0
    raw_bytes: int = 0
    """What the same KV weighs as raw fp16."""
    levels: list[str] = field(default_factory=list)
    transfer_ok: bool = True
    message: str = ""
    data_plane: str = ""
    """What carried the KV bytes: "shm", "tcp", "mooncake" or "grpc" (inline); "" when
    nothing was sent (transfer.data_plane, docs/transfer.md)."""

    queue_s: float = 0.0
    """Waiting for the worker's compute thread."""
    prefix_load_s: float = 0.0
    """Loading the cached prefix from the kvstore into paged blocks."""

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens_by_tier.values())

    def stage_ms(self) -> dict[str, float]:
        """This prefill's serving stages (kvcluster.common.requests.STAGES), in ms."""
        return {"prefill_queue": self.queue_s * 1e3, "prefill_prefix_load": self.prefix_load_s * 1e3,
                "prefill": self.prefill_s * 1e3, "kv_send": self.transfer_s * 1e3}


@dataclass(frozen=True)
class DecodeTask:
    request_id: str
    token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = ""
    expect_kv: bool = False
    """True: a prefill worker streams this request's KV to us; wait for it."""
    kv_timeout_s: float = 30.0


@dataclass(frozen=True)
class DecodeStep:
    """One streamed item from a decode worker: a token, or the final summary."""

    token_id: int = -1
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    """Final only: prompt tokens whose KV was not computed by this worker."""
    kv_source: str = ""
    """Final only: "transfer", "local-store", "prefix-cache" (this engine's own blocks),
    "recompute" or "none"."""
    first_token_s: float = 0.0
    """Final only: seconds from the task's arrival to its first token."""
    first_token_time: float = 0.0
    """Final only: wall-clock time (``time.time()``) its first token was sampled, for the
    relay's share of TTFT (same clock on one node; approximate across nodes)."""
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    """Final only: ``num_cached_tokens`` by source ("transfer", "prefix_cache", a tier)."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Final only: this worker's serving stages (kvcluster.common.requests.STAGES)."""
