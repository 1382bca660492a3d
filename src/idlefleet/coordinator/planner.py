"""How big a work unit is and how long its lease lasts: pure arithmetic, no I/O.

Units are cut by guided self-scheduling (Polychronopoulos & Kuck, 1987): a vehicle gets a share
of the remaining work, ``pending / (2 * vehicles)``, bounded by the vehicle's own limit and by
``[min_requests, max_requests]``. Early units are large (little protocol overhead); the last
units are small, so the batch does not wait on one car finishing a big unit while the others
idle, and a lost car costs little work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitPolicy:
    """Bounds on unit size and the lease length (seconds) that progress keeps extending."""

    min_requests: int = 4
    max_requests: int = 256
    lease_seconds: float = 30.0
    max_bytes: int = 2 * 1024 * 1024
    """A unit's inputs at most this many bytes (its grant is one NATS message); a request of
    up to this size goes alone."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_requests <= self.max_requests:
            raise ValueError("unit bounds must satisfy 1 <= min_requests <= max_requests")
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")


def unit_size(
    pending: int,
    active_vehicles: int,
    vehicle_max: int,
    policy: UnitPolicy,
    vehicle_min: int = 1,
) -> int:
    """Number of requests to lease to one vehicle now (at least ``vehicle_min``, what the
    vehicle runs at full speed, e.g. an LLM engine's sequences decoded together)."""
    share = math.ceil(pending / (2 * max(1, active_vehicles)))
    size = max(policy.min_requests, vehicle_min, share)
    return max(1, min(size, policy.max_requests, vehicle_max, pending))
