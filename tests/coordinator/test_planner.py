"""Guided self-scheduling of unit sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlefleet.coordinator.planner import UnitPolicy, unit_size


def test_early_units_are_a_share_of_the_work_and_late_ones_small() -> None:
    policy = UnitPolicy(min_requests=4, max_requests=256)
    assert unit_size(5000, 2, 1000, policy) == 256
    assert unit_size(400, 2, 1000, policy) == 100
    assert unit_size(10, 2, 1000, policy) == 4
    assert unit_size(3, 2, 1000, policy) == 3
    # A car whose engine decodes 32 sequences together gets 32 while there are that many.
    assert unit_size(100, 2, 1000, policy, vehicle_min=32) == 32
    assert unit_size(20, 2, 1000, policy, vehicle_min=32) == 20
    assert unit_size(5000, 2, 1000, policy, vehicle_min=32) == 256


def test_vehicle_limit_bounds_the_unit() -> None:
    assert unit_size(5000, 1, 32, UnitPolicy()) == 32


@given(
    pending=st.integers(1, 100_000),
    vehicles=st.integers(0, 10_000),
    vehicle_max=st.integers(1, 10_000),
)
def test_size_is_always_within_bounds(pending: int, vehicles: int, vehicle_max: int) -> None:
    policy = UnitPolicy(min_requests=4, max_requests=256)
    size = unit_size(pending, vehicles, vehicle_max, policy)
    assert 1 <= size <= min(pending, vehicle_max, 256)


@pytest.mark.parametrize(("lo", "hi", "lease"), [(0, 10, 1.0), (10, 5, 1.0), (1, 5, 0.0)])
def test_bad_policies_are_refused(lo: int, hi: int, lease: float) -> None:
    with pytest.raises(ValueError):
        UnitPolicy(min_requests=lo, max_requests=hi, lease_seconds=lease)
