"""The policy guard: each blocker, the safety invariants, hours, departure and hysteresis."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.agent.policy_guard import SAFETY_REASONS, PolicyGuard, blockers
from idlefleet.agent.sources.trace import parked_state
from idlefleet.agent.vehicle_state import StateAssembler, StateReading, VehicleState
from idlefleet.protocol.policy import OwnerPolicy

NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
LOCK = "Vehicle.Powertrain.Transmission.IsParkLockEngaged"
SEAT = "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus"
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"


def reading(**changes: Any) -> StateReading:
    signals = parked_state(soc=80.0)
    signals.update(changes)
    return StateAssembler().apply(signals, NOON)


def codes(r: StateReading | None, policy: OwnerPolicy, now: float = NOON, kwh: float = 0) -> set:
    return {code for code, _ in blockers(r, policy, now, kwh)}


OPTED_IN = OwnerPolicy(opted_in=True)


def test_a_parked_charging_car_of_an_opted_in_owner_may_compute() -> None:
    assert codes(reading(), OPTED_IN) == set()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({GEAR: 127, LOCK: False}, "not_parked"),
        ({"Vehicle.IsMoving": True}, "moving"),
        ({"Vehicle.Speed": 3.0}, "speed"),
        ({"Vehicle.LowVoltageSystemState": "START"}, "starting"),
        ({SEAT: "OCCUPIED"}, "driver_present"),
        ({SEAT: "UNKNOW"}, "driver_present"),
        ({"Vehicle.Powertrain.TractionBattery.Charging.IsCharging": False}, "not_charging"),
        ({SOC: 50.0}, "soc_floor"),
        ({SOC: None}, "soc_floor"),
        ({"Vehicle.Powertrain.TractionBattery.Temperature.Average": 46.0}, "battery_hot"),
        ({"Vehicle.ControlUnit.Inference.Health.Resources.Temperature": 91.0}, "chip_hot"),
        ({"Vehicle.ControlUnit.Inference.Health.Resources.Temperature": None}, "chip_hot"),
    ],
)
def test_each_condition_blocks_with_its_own_reason(changes: dict, expected: str) -> None:
    assert codes(reading(**changes), OPTED_IN) == {expected}


def test_park_lock_alone_counts_as_parked() -> None:
    assert codes(reading(**{GEAR: 0, LOCK: True}), OPTED_IN) == set()


def test_garbage_and_missing_readings_block() -> None:
    garbage = StateAssembler().apply({**parked_state(), SOC: 140.0}, NOON)
    assert "state_unreadable" in codes(garbage, OPTED_IN)
    assert codes(None, OPTED_IN) == {"state_unreadable"}
    empty = StateReading(VehicleState(), NOON)
    assert {"not_parked", "moving", "speed", "starting", "driver_present"} <= codes(empty, OPTED_IN)


def test_owner_limits() -> None:
    assert codes(reading(), OwnerPolicy()) == {"opted_out"}
    anytime = OPTED_IN.model_copy(update={"charging_only": False})
    not_charging = reading(**{"Vehicle.Powertrain.TractionBattery.Charging.IsCharging": False})
    assert codes(not_charging, anytime) == set()
    assert codes(reading(), OPTED_IN, kwh=10.0) == {"energy_cap"}
    assert codes(reading(), OPTED_IN, kwh=9.99) == set()
    uncapped = OPTED_IN.model_copy(update={"daily_energy_cap_kwh": None})
    assert codes(reading(), uncapped, kwh=1e6) == set()


@pytest.mark.parametrize(
    ("windows", "zone", "hour", "allowed"),
    [
        (["22:00-07:00"], "UTC", 23, True),
        (["22:00-07:00"], "UTC", 6, True),
        (["22:00-07:00"], "UTC", 7, False),
        (["22:00-07:00"], "UTC", 12, False),
        (["09:00-17:00", "20:00-21:00"], "UTC", 20, True),
        # 12:00 UTC is 13:00 in Berlin in November (UTC+1).
        (["13:00-14:00"], "Europe/Berlin", 12, True),
        (["12:00-13:00"], "Europe/Berlin", 12, False),
    ],
)
def test_allowed_hours_in_the_owners_zone(
    windows: list[str], zone: str, hour: int, allowed: bool
) -> None:
    policy = OPTED_IN.model_copy(update={"allowed_hours": windows, "timezone": zone})
    now = datetime(2026, 11, 22, hour, 0, tzinfo=UTC).timestamp()
    assert (codes(reading(), policy, now) == set()) is allowed


@pytest.mark.parametrize(
    ("departure", "minute_now", "blocked"),
    [("12:30", 0, True), ("12:30", -1, False), ("12:00", 0, False), ("00:10", 11 * 60 + 50, True)],
)
def test_work_stops_before_the_expected_departure(
    departure: str, minute_now: int, blocked: bool
) -> None:
    policy = OPTED_IN.model_copy(
        update={"departure_time": departure, "stop_before_departure_min": 30}
    )
    # minute_now counts from 12:00 UTC; -1 is 11:59 (31 minutes before 12:30).
    now = NOON + 60 * minute_now
    assert ("departure_soon" in codes(reading(), policy, now)) is blocked


def test_hysteresis_waits_after_any_blocker_but_stops_at_once() -> None:
    guard = PolicyGuard(OPTED_IN, resume_after_s=300)
    fine = reading()
    assert guard.observe(fine, NOON).reasons == ("settling",)  # not yet held for 300 s
    assert not guard.observe(fine, NOON + 299).allowed
    assert guard.observe(fine, NOON + 300).allowed
    assert guard.observe(fine, NOON + 301).allowed
    stopped = guard.observe(reading(**{SEAT: "OCCUPIED"}), NOON + 302)
    assert not stopped.allowed and stopped.reasons == ("driver_present",)
    assert guard.observe(fine, NOON + 303).reasons == ("settling",)
    assert not guard.observe(fine, NOON + 602).allowed
    assert guard.observe(fine, NOON + 603).allowed


def test_a_clock_that_jumps_back_restarts_the_wait() -> None:
    guard = PolicyGuard(OPTED_IN, resume_after_s=60)
    guard.observe(reading(), NOON)
    assert not guard.observe(reading(), NOON - 3600).allowed
    assert not guard.observe(reading(), NOON - 3600 + 59).allowed
    assert guard.observe(reading(), NOON - 3600 + 60).allowed


# -- properties ------------------------------------------------------------------------------
policies = st.builds(
    OwnerPolicy,
    opted_in=st.booleans(),
    charging_only=st.booleans(),
    soc_floor_percent=st.floats(0, 100),
    max_battery_temp_c=st.floats(-40, 80),
    max_chip_temp_c=st.floats(0, 150),
    daily_energy_cap_kwh=st.none() | st.floats(0, 1000),
)
states = st.builds(
    VehicleState,
    speed_kmh=st.none() | st.sampled_from([0.0, 0.1, 30.0]),
    is_moving=st.none() | st.booleans(),
    selected_gear=st.none() | st.sampled_from([126, 127, 0, -1, 1]),
    park_lock_engaged=st.none() | st.booleans(),
    low_voltage_state=st.none()
    | st.sampled_from(["UNDEFINED", "LOCK", "OFF", "ACC", "ON", "START"]),
    soc_percent=st.none() | st.floats(0, 100),
    is_charging=st.none() | st.booleans(),
    battery_temp_c=st.none() | st.floats(-60, 120),
    driver_seat=st.none() | st.sampled_from(["UNKNOW", "OCCUPIED", "EMPTY"]),
    chip_temp_c=st.none() | st.floats(-60, 150),
)


@given(state=states, policy=policies)
def test_no_policy_overrides_the_safety_invariants(
    state: VehicleState, policy: OwnerPolicy
) -> None:
    guard = PolicyGuard(policy, resume_after_s=0)
    verdict = guard.observe(StateReading(state, NOON), NOON)
    parked = (
        (state.selected_gear == 126 or state.park_lock_engaged is True)
        and state.is_moving is False
        and state.speed_kmh == 0.0
    )
    safe = (
        parked and state.low_voltage_state not in (None, "START") and state.driver_seat == "EMPTY"
    )
    if not safe:
        assert not verdict.allowed
        assert SAFETY_REASONS & set(verdict.reasons)
    if verdict.allowed:
        assert policy.opted_in
        assert state.soc_percent is not None and state.soc_percent > policy.soc_floor_percent


@settings(max_examples=200)
@given(
    steps=st.lists(st.tuples(st.floats(0, 600), st.booleans()), min_size=1, max_size=30),
    resume=st.floats(0, 600),
)
def test_allowed_only_after_conditions_held_for_resume_after(
    steps: list[tuple[float, bool]], resume: float
) -> None:
    guard = PolicyGuard(OPTED_IN, resume_after_s=resume)
    now = NOON
    last_blocked = None
    for gap, blocked in steps:
        now += gap
        r = reading(**{SEAT: "OCCUPIED"}) if blocked else reading()
        verdict = guard.observe(r, now)
        if blocked:
            last_blocked = now
            assert not verdict.allowed
        elif verdict.allowed and last_blocked is not None:
            assert now - last_blocked >= resume
