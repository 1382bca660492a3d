"""The clock- and weather-bound policy rules as intervals, held to the car's `blockers`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.agent.policy_guard import blockers
from idlefleet.agent.sources.trace import parked_state
from idlefleet.agent.vehicle_state import StateAssembler
from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.sim.rules import Weather, allowed_intervals, ambient_c, subtract

MIDNIGHT = datetime(2026, 11, 23, tzinfo=UTC).timestamp()
CLOCK_RULES = {"outside_hours", "departure_soon", "battery_hot", "chip_hot"}
BATTERY = "Vehicle.Powertrain.TractionBattery.Temperature.Average"
CHIP = "Vehicle.ControlUnit.Inference.Health.Resources.Temperature"

hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
window = st.tuples(hhmm, hhmm).filter(lambda w: w[0] != w[1]).map(lambda w: f"{w[0]}-{w[1]}")
policies = st.builds(
    OwnerPolicy,
    opted_in=st.just(True),
    allowed_hours=st.lists(window, max_size=3, unique=True),
    departure_time=st.none() | hhmm,
    stop_before_departure_min=st.integers(0, 240),
    max_battery_temp_c=st.floats(20, 60),
    max_chip_temp_c=st.floats(40, 100),
)
weathers = st.builds(Weather, mean_c=st.floats(-10, 45), swing_c=st.floats(0, 15))


def inside(intervals: list[tuple[float, float]], minute: float) -> bool:
    return any(lo <= minute < hi for lo, hi in intervals)


@settings(max_examples=300, deadline=None)
@given(policy=policies, weather=weathers, minutes=st.lists(st.integers(0, 1439), max_size=40))
def test_allowed_intervals_agree_with_the_guard_minute_by_minute(
    policy: OwnerPolicy, weather: Weather, minutes: list[int]
) -> None:
    # Arrange: the model's intervals for this policy and weather.
    allowed = allowed_intervals(policy, weather, battery_rise_c=5.0, chip_idle_rise_c=15.0)
    for minute in [0, 359, 720, 1439, *minutes]:
        # Act: the real guard on a parked, charging, full car at that minute and temperature.
        ambient = ambient_c(weather, minute)
        signals = {**parked_state(soc=90.0), BATTERY: ambient + 5.0, CHIP: ambient + 15.0}
        reading = StateAssembler().apply(signals, MIDNIGHT + minute * 60)
        found = {code for code, _ in blockers(reading, policy, MIDNIGHT + minute * 60)}

        # Assert: blocked by a clock or weather rule exactly when outside the intervals.
        assert found <= CLOCK_RULES
        assert inside(allowed, minute) == (not found), (minute, found, allowed)


def test_hours_across_midnight_become_two_intervals() -> None:
    policy = OwnerPolicy(allowed_hours=["22:00-06:00"])
    assert allowed_intervals(policy, Weather(10, 5), 5, 15) == [(0.0, 360.0), (1320.0, 1440.0)]


def test_a_declared_departure_cuts_its_margin_out_of_the_day() -> None:
    policy = OwnerPolicy(departure_time="00:20", stop_before_departure_min=30)
    assert allowed_intervals(policy, Weather(10, 5), 5, 15) == [(20.0, 1430.0)]


def test_a_hot_afternoon_blocks_around_three_pm() -> None:
    # Battery at ambient + 5 exceeds 45 °C when ambient > 40: mean 36, swing 8 → around 15:00.
    (first, second) = allowed_intervals(OwnerPolicy(), Weather(36, 8), 5, 15)
    assert first[0] == 0.0 and second[1] == 1440.0
    assert first[1] < 15 * 60 < second[0]
    assert ambient_c(Weather(36, 8), first[1]) == pytest.approx(40.0)


def test_weather_too_hot_all_day_allows_nothing() -> None:
    assert allowed_intervals(OwnerPolicy(), Weather(45, 0), 5, 15) == []


def test_subtract_handles_overlaps_and_touching_edges() -> None:
    assert subtract([(0, 100), (200, 300)], [(50, 250), (300, 400)]) == [(0, 50), (250, 300)]
    assert subtract([(0, 100)], [(0, 100)]) == []
    assert subtract([(0, 100)], []) == [(0, 100)]
