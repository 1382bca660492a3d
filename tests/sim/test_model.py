"""The fleet model: calibration, energy conservation, determinism and its own bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.sim.context import build_context
from idlefleet.sim.model import simulate_chunk
from idlefleet.sim.params import PolicyProfile, SimParams
from idlefleet.sim.run import simulate


@pytest.fixture(scope="module")
def default_week():
    return simulate(SimParams.build(vehicles=30_000, days=7, chunk_vehicles=10_000), workers=1)


def test_defaults_are_calibrated_to_parked_95_percent_and_an_hour_of_driving(default_week) -> None:
    calibration = default_week.summary()["calibration"]
    assert 0.94 <= calibration["parked_fraction"] <= 0.97
    assert 45 <= calibration["driving_min_per_vehicle_day"] <= 75
    # NHTS 2017: 2.9 trips per vehicle-day; we only need the right ballpark.
    assert 2.0 <= calibration["trips_per_vehicle_day"] <= 3.5


def test_parked_and_driving_time_fill_every_day_exactly(default_week) -> None:
    t = default_week.tally
    assert t.parked_min + t.drive_min == pytest.approx(t.vehicle_days * 1440, rel=1e-9)


def test_the_factors_multiply_to_sustained_compute_over_nameplate(default_week) -> None:
    f = default_week.factors()
    t = default_week.tally
    product = f["availability"] * f["opt_in"] * f["charging"] * f["thermal"]
    assert product == pytest.approx(t.sustained_tops_min / t.tops_min, rel=1e-12)
    assert all(0 < value < 1 for value in f.values())


def test_the_time_series_integrate_to_the_totals(default_week) -> None:
    # Interval ends are floored to the minute, so agreement is to rounding, not exact.
    t = default_week.tally
    levels = t.levels()
    assert levels.min() >= -1e-6
    assert levels[0].sum() == pytest.approx(t.parked_min, rel=1e-3)
    assert levels[2].sum() == pytest.approx(t.parked_tops_min, rel=1e-3)
    assert levels[3].sum() == pytest.approx(t.opted_parked_tops_min, rel=1e-3)
    assert levels[4].sum() == pytest.approx(t.compute_min, rel=1e-3)
    assert levels[5].sum() == pytest.approx(t.computing_tops_min, rel=1e-3)
    assert levels[6].sum() == pytest.approx(t.sustained_tops_min, rel=1e-3)
    assert levels[7].sum() / 60 == pytest.approx(t.compute_kwh, rel=1e-3)
    assert levels[1].max() <= levels[0].max()  # plugged cars are parked cars


def test_histograms_count_every_session_and_window(default_week) -> None:
    t = default_week.tally
    assert t.session_hist.sum() == t.sessions
    assert t.ended_departure + t.ended_hours + t.ended_cap + t.ended_floor == pytest.approx(
        t.sessions,
        abs=t.vehicles,  # sessions still open when the run ends have no end reason
    )
    assert t.earnings_hist.sum() == t.opted_in_vehicles


VARIANTS = {
    "defaults": {},
    "everyone_in_unplugged_compute": {
        "opt_in_rate": 1.0,
        "policies": [
            PolicyProfile(
                name="all",
                share=1,
                policy=OwnerPolicy(
                    charging_only=False, soc_floor_percent=20, daily_energy_cap_kwh=None
                ),
            )
        ],
    },
    "chargers_weaker_than_the_computer": {
        "opt_in_rate": 1.0,
        "hardware": [
            {"name": "big", "share": 1, "int8_tops": 5000, "compute_kw": 1.5, "memory_gib": 64}
        ],
        "charging": {"home_charger_kw": 1.0, "public_plug_prob": 0.5, "home_charger_share": 1.0},
    },
    "half_utilisation": {"opt_in_rate": 1.0, "economics": {"utilization": 0.5}},
    "small_batteries_long_trips": {
        "opt_in_rate": 1.0,
        "charging": {"battery_kwh": [20.0], "battery_share": [1.0], "reserve_soc": 0.2},
        "travel": {"commute_trip_median_min": 60.0, "speed_kmh": 80.0},
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_energy_is_conserved_car_by_car(variant: str) -> None:
    # Arrange: the model keeps separate accounts of grid, driving and compute energy.
    params = SimParams.build(vehicles=5_000, days=5, seed=7, **VARIANTS[variant])
    tally, acc, _ = simulate_chunk(build_context(params), 0, params.vehicles)

    # Act: battery change against what flowed in and out.
    change = acc.final_kwh - acc.initial_kwh
    flows = acc.efficiency * (acc.grid_kwh + acc.fast_grid_kwh) - acc.drive_kwh - acc.compute_kwh

    # Assert
    assert np.abs(change - flows).max() < 1e-9 * max(1.0, float(np.abs(flows).max()))
    assert tally.compute_kwh > 0 and tally.drive_kwh > 0 and tally.grid_kwh > 0
    assert (acc.min_kwh >= -1e-9).all()
    battery = np.asarray(params.charging.battery_kwh).max()
    assert (acc.max_kwh <= battery + 1e-9).all()


def test_compute_never_starts_at_or_ends_below_the_floor() -> None:
    params = SimParams.build(vehicles=2_000, days=3, seed=5, opt_in_rate=1.0)
    ctx = build_context(params)
    _, _, rec = simulate_chunk(ctx, 0, params.vehicles, record=True)
    assert rec is not None and rec.sessions
    floor = ctx.floor_fraction[rec.population.profile] * rec.population.battery_kwh
    for v, _, start, stop, e_start, e_stop in rec.sessions:
        assert stop > start
        assert e_start > floor[v]
        assert e_stop >= floor[v] - 1e-9


def test_no_compute_when_nobody_opts_in() -> None:
    result = simulate(SimParams.build(vehicles=3_000, days=2, opt_in_rate=0.0), workers=1)
    assert result.tally.compute_min == 0
    assert result.tally.compute_kwh == 0
    assert result.tally.parked_min > 0


def test_more_owners_opting_in_means_more_compute() -> None:
    low, high = (
        simulate(SimParams.build(vehicles=4_000, days=2, opt_in_rate=rate), workers=1)
        for rate in (0.2, 0.8)
    )
    ratio = high.tally.sustained_tops_min / low.tally.sustained_tops_min
    assert 3.0 < ratio < 5.0  # ~4x, give or take which cars were drawn


def test_the_result_does_not_depend_on_the_number_of_processes() -> None:
    params = SimParams.build(vehicles=6_000, days=2, chunk_vehicles=2_000, seed=3)
    one = simulate(params, workers=1)
    two = simulate(params, workers=2)
    assert one.summary()["factors"] == two.summary()["factors"]
    assert np.array_equal(one.tally.series, two.tally.series)
    assert one.tally.compute_kwh == two.tally.compute_kwh


def test_a_different_seed_gives_a_different_but_similar_fleet() -> None:
    a, b = (
        simulate(SimParams.build(vehicles=10_000, days=2, seed=s), workers=1).summary()
        for s in (1, 2)
    )
    assert a["compute"] != b["compute"]
    assert a["calibration"]["parked_fraction"] == pytest.approx(
        b["calibration"]["parked_fraction"], abs=0.005
    )
