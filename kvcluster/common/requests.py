"""Request and stream-event types between the front end and a serving backend (pure Python).

A backend answers one :class:`GenerateRequest` with zero or more
:class:`TokenEvent` then exactly one :class:`FinalEvent`. These are plain,
picklable values, so they cross process boundaries (Ray) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcluster.common.sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise ValueError(f"chat role must be one of {list(CHAT_ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    tenant: str
    """Cache namespace: the tenant's KV is never shared with another tenant."""
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    slo_ms: float = 0.0
    """Time-to-first-token objective; 0: none."""
    deadline: float | None = None
    """Absolute wall-clock time (``time.time()``) after which the answer is useless."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: empty prompt")
        if self.slo_ms < 0:
            raise ValueError(f"slo_ms must be >= 0, got {self.slo_ms}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    text: str = ""
    """Text delta; backends leave it empty, the front end detokenizes."""


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: str
    """"stop" (stop token or string) or "length"."""
    ttft_ms: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from a cache instead of being computed."""
    num_output_tokens: int = 0
    request_id: str = ""
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    """``num_cached_tokens`` by source: a kvstore tier ("device", "host", "disk",
    "redis"), "transfer" (from a prefill worker) or "prefix_cache" (the engine's blocks)."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per serving stage (STAGES names them; a backend reports what it has)."""


STAGES = ("route", "kv_transfer", "prefix_load", "queue", "first_decode_step", "token_relay",
          "prefill_queue", "prefill_prefix_load", "prefill", "kv_send")
"""The serving stages a request's time is split into (FinalEvent.stage_ms keys). Before
the first token, in order: picking instances (``route``); on the decode worker, waiting
for a prefill worker's KV stream (``kv_transfer``), loading a stored prefix into paged
blocks (``prefix_load``), waiting in the engine's queue (``queue``) and the engine step
that computes the uncached tail and samples the first token (``first_decode_step``);
then getting that token to the front end (``token_relay``). A prefill worker's share
of ``kv_transfer``: its queue, its prefix load, its prefill forward passes and the
stream itself (``prefill_queue``, ``prefill_prefix_load``, ``prefill``, ``kv_send``)."""


StreamEvent = TokenEvent | FinalEvent
