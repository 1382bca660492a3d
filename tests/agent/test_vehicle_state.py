"""VSS signals into a typed vehicle state; garbage is refused with the path and the problem."""

from __future__ import annotations

import math

import pytest

from idlefleet.agent.vehicle_state import (
    SIGNALS,
    StateAssembler,
    StateError,
    VehicleState,
)

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"


def test_signals_round_trip_through_the_state() -> None:
    signals = {
        "Vehicle.Speed": 0.0,
        "Vehicle.IsMoving": False,
        GEAR: 126,
        "Vehicle.LowVoltageSystemState": "OFF",
        SOC: 81.5,
        "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "EMPTY",
        "Vehicle.ControlUnit.Inference.Health.Resources.Power": 72.0,
    }
    state = VehicleState.from_signals(signals)
    assert state.selected_gear == 126 and state.soc_percent == 81.5
    assert state.chip_power_w == 72.0
    assert state.to_signals() == signals
    assert state.parked


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (SOC, 140, "outside 0..100 percent"),
        (SOC, -1.0, "outside"),
        (SOC, math.nan, "finite"),
        # Beyond any float: math.isfinite raised OverflowError, which stopped a trace's replay.
        (SOC, 10**400, "finite"),
        (GEAR, -(10**400), "finite"),
        (SOC, "80", "expected a number"),
        (SOC, True, "expected a number"),
        ("Vehicle.IsMoving", 0, "expected true or false"),
        (GEAR, 126.5, "whole number"),
        ("Vehicle.LowVoltageSystemState", "RUNNING", "expected one of"),
        ("Vehicle.Speedd", 0, "unknown VSS signal"),
    ],
)
def test_bad_values_are_refused_naming_the_path(path: str, value: object, problem: str) -> None:
    with pytest.raises(StateError) as excinfo:
        VehicleState.from_signals({path: value})
    assert path in str(excinfo.value) and problem in str(excinfo.value)


def test_parked_needs_park_or_lock_and_standstill() -> None:
    base = VehicleState(speed_kmh=0.0, is_moving=False)
    assert VehicleState(**{**base.__dict__, "selected_gear": 126}).parked
    assert VehicleState(**{**base.__dict__, "selected_gear": 0, "park_lock_engaged": True}).parked
    assert not VehicleState(**{**base.__dict__, "selected_gear": 127}).parked
    assert not VehicleState(selected_gear=126, speed_kmh=0.0).parked  # IsMoving unknown


def test_assembler_merges_updates_and_keeps_a_broken_signal_broken_until_fixed() -> None:
    assembler = StateAssembler()
    first = assembler.apply({GEAR: 126, SOC: 80.0}, at=1.0)
    assert first.readable and first.state.soc_percent == 80.0

    broken = assembler.apply({SOC: 140.0}, at=2.0)
    assert not broken.readable and SOC in (broken.error or "")
    assert broken.state.soc_percent == 80.0  # the last good value is kept for display

    still = assembler.apply({GEAR: 127}, at=3.0)
    assert not still.readable and still.state.selected_gear == 127

    fixed = assembler.apply({SOC: 79.0}, at=4.0)
    assert fixed.readable and fixed.state.soc_percent == 79.0


def test_unknown_signals_spoil_only_their_own_reading_and_loss_is_reported() -> None:
    assembler = StateAssembler()
    assert not assembler.apply({"Vehicle.Nope": 1}, at=1.0).readable
    assert assembler.apply({GEAR: 126}, at=2.0).readable
    lost = assembler.lost("databroker gone", at=3.0)
    assert not lost.readable and "databroker gone" in (lost.error or "")
    assert assembler.apply({GEAR: 126}, at=4.0).readable


def test_every_signal_has_a_vss_path_under_vehicle() -> None:
    assert all(path.startswith("Vehicle.") for path in SIGNALS)
