"""Per-tenant request limits: sizes checked up front, rates by token bucket.

Every violation is a :class:`kvcluster.common.errors.KVClusterError`:
:class:`InvalidRequestError` (INVALID_ARGUMENT) for a request that can never
succeed, :class:`RateLimitedError` (RESOURCE_EXHAUSTED) for one that may succeed later.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from kvcluster.common.config import LimitsConfig
from kvcluster.common.errors import InvalidRequestError, RateLimitedError


def check_request_size(limits: LimitsConfig, *, num_prompt_tokens: int,
                       max_new_tokens: int) -> None:
    """Raise InvalidRequestError when a request exceeds the configured sizes."""
    if num_prompt_tokens <= 0:
        raise InvalidRequestError("prompt is empty")
    if num_prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(f"prompt has {num_prompt_tokens} tokens; "
                                  f"the limit is {limits.max_prompt_tokens}")
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidRequestError(f"max_new_tokens={max_new_tokens} must be in "
                                  f"[1, {limits.max_new_tokens}]")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantRateLimiter:
    """Token bucket per tenant: ``requests_per_s`` refill, ``burst`` capacity.

    A bucket idle for ``burst / requests_per_s`` seconds is full again, the same
    as a new one, so such buckets are dropped (swept at most once per that
    period): memory follows the tenants active lately, not every name ever seen.
    """

    def __init__(self, requests_per_s: float, burst: int, clock=time.monotonic):
        self._rate = requests_per_s
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._refill_s = self._burst / self._rate
        self._last_sweep = clock()

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> "TenantRateLimiter":
        return cls(limits.requests_per_s, limits.burst)

    @property
    def num_tenants(self) -> int:
        """Tenants with a bucket that is not known to be full."""
        return len(self._buckets)

    def acquire(self, tenant: str) -> None:
        """Take one request's token or raise RateLimitedError."""
        with self._lock:
            bucket = self._refill(tenant)
            if bucket.tokens < 1.0:
                wait_s = (1.0 - bucket.tokens) / self._rate
                raise RateLimitedError(f"tenant {tenant!r} is over its rate limit of "
                                       f"{self._rate:g} requests/s; retry in {wait_s:.2f} s")
            bucket.tokens -= 1.0

    def _refill(self, tenant: str) -> _Bucket:
        now = self._clock()
        if now - self._last_sweep >= self._refill_s:
            self._sweep(now)
        bucket = self._buckets.setdefault(tenant, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        return bucket

    def _sweep(self, now: float) -> None:
        self._buckets = {tenant: bucket for tenant, bucket in self._buckets.items()
                         if now - bucket.updated < self._refill_s}
        self._last_sweep = now
