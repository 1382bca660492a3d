"""Per-car token buckets."""

from __future__ import annotations

import pytest

from idlefleet.coordinator.ratelimit import RateLimit, TokenBuckets


def test_a_car_gets_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(RateLimit(per_second=10, burst=5))

    burst = [buckets.allow("car-1", 0.0) for _ in range(7)]
    later = [buckets.allow("car-1", 0.5) for _ in range(7)]  # 0.5 s refills 5 tokens

    assert burst == [True] * 5 + [False] * 2
    assert later == [True] * 5 + [False] * 2


def test_one_flooding_car_does_not_use_up_anothers_budget() -> None:
    buckets = TokenBuckets(RateLimit(per_second=1, burst=2))

    flood = sum(buckets.allow("flooder", 0.0) for _ in range(1000))

    assert flood == 2
    assert buckets.allow("quiet", 0.0) and buckets.allow("quiet", 0.0)


def test_idle_buckets_are_forgotten() -> None:
    buckets = TokenBuckets(RateLimit(per_second=10, burst=5))
    buckets.allow("a", 0.0)
    buckets.allow("b", 0.9)

    forgotten = buckets.forget_idle(1.0)

    assert forgotten == 1 and len(buckets) == 1


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0.5)])
def test_a_limit_that_allows_nothing_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit(per_second=rate, burst=burst)
