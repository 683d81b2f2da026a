import pytest

from kvcluster.common.config import LimitsConfig
from kvcluster.common.errors import (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, InvalidRequestError,
                                     RateLimitedError)
from kvcluster.server.limits import TenantRateLimiter, check_request_size

LIMITS = LimitsConfig(max_prompt_tokens=100, max_new_tokens=10)


@pytest.mark.parametrize("prompt, new, needle", [
    (0, 5, "empty"), (101, 5, "101 tokens"), (10, 0, "max_new_tokens=0"),
    (10, 11, "max_new_tokens=11"),
])
def test_size_violations_are_invalid_argument(prompt, new, needle):
    with pytest.raises(InvalidRequestError) as info:
        check_request_size(LIMITS, num_prompt_tokens=prompt, max_new_tokens=new)
    assert info.value.code == INVALID_ARGUMENT and needle in info.value.message


def test_sizes_within_limits_pass():
    check_request_size(LIMITS, num_prompt_tokens=100, max_new_tokens=10)


def test_rate_limit_per_tenant_with_refill():
    now = [0.0]
    limiter = TenantRateLimiter(requests_per_s=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("a")
    with pytest.raises(RateLimitedError) as info:
        limiter.acquire("a")
    assert info.value.code == RESOURCE_EXHAUSTED and "'a'" in info.value.message
    limiter.acquire("b")  # another tenant has its own bucket
    now[0] = 0.5  # one token refilled at 2/s
    limiter.acquire("a")
    with pytest.raises(RateLimitedError):
        limiter.acquire("a")


def test_idle_tenants_are_forgotten_without_changing_any_answer():
    now = [0.0]
    limiter = TenantRateLimiter(requests_per_s=2, burst=3, clock=lambda: now[0])
    for i in range(1000):  # random tenant names, one request each
        limiter.acquire(f"t{i}")
    for _ in range(3):
        limiter.acquire("busy")
    assert limiter.num_tenants == 1001
    now[0] = 1.0  # "busy" has refilled 2 of 3 tokens; the others are full
    limiter.acquire("busy")
    assert limiter.num_tenants == 1001  # not yet a whole refill period (1.5 s)
    now[0] = 1.6
    limiter.acquire("busy")  # sweep: every bucket idle for >= 1.5 s is full, dropped
    assert limiter.num_tenants == 1
    limiter.acquire("busy")
    with pytest.raises(RateLimitedError):  # still its own, partly drained bucket
        limiter.acquire("busy")
    for _ in range(3):
        limiter.acquire("t5")  # a dropped tenant starts full, as it would have been
