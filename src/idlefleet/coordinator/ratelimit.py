"""Per-car message budgets (token buckets), so one flooding car cannot slow the others.

Checked first, before a message is even decoded, so a refused message costs a dict lookup and
a few float operations. A well-behaved agent sends a heartbeat every few seconds, a work request
per unit and a result chunk per few seconds of compute: far below the defaults. Pure: the
caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBuckets"]


@dataclass(frozen=True)
class RateLimit:
    """A sustained rate and the burst allowed above it."""

    per_second: float = 50.0
    burst: float = 200.0

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and self.burst >= 1):
            raise ValueError("a rate limit needs per_second > 0 and burst >= 1")


class TokenBuckets:
    """One token bucket per key (car id); a key idle long enough to refill is forgotten."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._refill_s = limit.burst / limit.per_second

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key``; False (and nothing taken) when its bucket is empty."""
        tokens, at = self._buckets.get(key, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + (now - at) * self.limit.per_second)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def forget_idle(self, now: float) -> int:
        """Drop buckets that would be full again (call now and then); returns how many."""
        idle = [k for k, (_, at) in self._buckets.items() if now - at >= self._refill_s]
        for key in idle:
            del self._buckets[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._buckets)
