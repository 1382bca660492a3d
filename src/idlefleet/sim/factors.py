"""The fleet model's availability factors, for the capacity calculator's "after" figures."""

from __future__ import annotations

from idlefleet.sim.capacity import AvailabilityFactors
from idlefleet.sim.params import SimParams
from idlefleet.sim.run import simulate

__all__ = ["fleet_model_factors"]


def fleet_model_factors(
    vehicles: int = 50_000, days: int = 7, seed: int = 0
) -> AvailabilityFactors:
    """Run the default fleet model (in this process, well under a second) and return its
    TOPS-weighted factors: time parked, opted-in share, policy and charging, thermal."""
    result = simulate(SimParams.build(vehicles=vehicles, days=days, seed=seed), workers=1)
    return AvailabilityFactors(
        **result.factors(),
        source=f"fleet model: {vehicles:,} vehicles × {days} days, seed {seed}, default parameters",
    )
