"""The car's state as the agent sees it, typed on COVESA VSS v6.0 signal names.

`VehicleState` holds the signals the policy guard needs; every field may be unknown (None),
and the guard treats an unknown safety signal as "not allowed". `SIGNALS` is the one table of
VSS paths, types and ranges: state sources deliver raw ``{path: value}`` updates, and
`StateAssembler` checks each value against that table and merges it into the last known state.
A value that fails the check is not dropped silently: the assembler reports the state as
unreadable (with the reason) until a valid value for that path arrives, because a state we
cannot read must stop work, not keep it going on stale values.

The inference chip is not in the VSS standard catalogue; we read it from an overlay branch,
``Vehicle.ControlUnit.Inference.Health.Resources.*`` (see ``vss/inference_overlay.vspec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

__all__ = [
    "GEAR_DRIVE",
    "GEAR_NEUTRAL",
    "GEAR_PARK",
    "SIGNALS",
    "Signal",
    "StateAssembler",
    "StateError",
    "StateReading",
    "VehicleState",
    "parse_signal",
]

GEAR_PARK = 126
"""VSS SelectedGear value for Park (127 is Drive, 0 Neutral, negative values are reverse)."""
GEAR_DRIVE = 127
GEAR_NEUTRAL = 0

LowVoltageState = Literal["UNDEFINED", "LOCK", "OFF", "ACC", "ON", "START"]
Occupancy = Literal["UNKNOW", "OCCUPIED", "EMPTY"]  # sic: VSS spells it UNKNOW


class StateError(ValueError):
    """A signal value from a state source that cannot be used (wrong type, range or path)."""


@dataclass(frozen=True)
class Signal:
    """How one VSS signal maps onto a `VehicleState` field, and which values are valid."""

    path: str
    field: str
    kind: Literal["bool", "float", "int", "enum"]
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[str, ...] = ()
    unit: str = ""


_CHIP = "Vehicle.ControlUnit.Inference.Health.Resources"

SIGNALS: dict[str, Signal] = {
    s.path: s
    for s in (
        Signal("Vehicle.Speed", "speed_kmh", "float", 0.0, 500.0, unit="km/h"),
        Signal("Vehicle.IsMoving", "is_moving", "bool"),
        Signal("Vehicle.Powertrain.Transmission.SelectedGear", "selected_gear", "int", -64, 127),
        Signal("Vehicle.Powertrain.Transmission.IsParkLockEngaged", "park_lock_engaged", "bool"),
        Signal(
            "Vehicle.LowVoltageSystemState",
            "low_voltage_state",
            "enum",
            allowed=("UNDEFINED", "LOCK", "OFF", "ACC", "ON", "START"),
        ),
        Signal(
            "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
            "soc_percent",
            "float",
            0.0,
            100.0,
            unit="percent",
        ),
        Signal("Vehicle.Powertrain.TractionBattery.Charging.IsCharging", "is_charging", "bool"),
        Signal(
            "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition."
            "IsChargingCableConnected",
            "cable_connected",
            "bool",
        ),
        Signal(
            "Vehicle.Powertrain.TractionBattery.Temperature.Average",
            "battery_temp_c",
            "float",
            -60.0,
            120.0,
            unit="celsius",
        ),
        Signal("Vehicle.CurrentLocation.Latitude", "latitude", "float", -90.0, 90.0),
        Signal("Vehicle.CurrentLocation.Longitude", "longitude", "float", -180.0, 180.0),
        Signal(
            "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus",
            "driver_seat",
            "enum",
            allowed=("UNKNOW", "OCCUPIED", "EMPTY"),
        ),
        Signal("Vehicle.Connectivity.IsConnectivityAvailable", "connectivity", "bool"),
        Signal(f"{_CHIP}.Temperature", "chip_temp_c", "float", -60.0, 150.0, unit="celsius"),
        Signal(f"{_CHIP}.Power", "chip_power_w", "float", 0.0, 10_000.0, unit="W"),
        Signal(f"{_CHIP}.Utilization", "chip_utilization", "float", 0.0, 100.0, unit="percent"),
    )
}


@dataclass(frozen=True)
class VehicleState:
    """One consistent view of the car. None means "not known"."""

    speed_kmh: float | None = None
    is_moving: bool | None = None
    selected_gear: int | None = None
    park_lock_engaged: bool | None = None
    low_voltage_state: LowVoltageState | None = None
    soc_percent: float | None = None
    is_charging: bool | None = None
    cable_connected: bool | None = None
    battery_temp_c: float | None = None
    latitude: float | None = None
    longitude: float | None = None
    driver_seat: Occupancy | None = None
    connectivity: bool | None = None
    chip_temp_c: float | None = None
    chip_power_w: float | None = None
    chip_utilization: float | None = None

    @classmethod
    def from_signals(cls, signals: Mapping[str, Any]) -> VehicleState:
        """Build a state from ``{VSS path: value}``; `StateError` names the first bad value."""
        return cls().with_signals(signals)

    def with_signals(self, signals: Mapping[str, Any]) -> VehicleState:
        """This state with ``signals`` applied; `StateError` if any of them is invalid."""
        changes = {}
        for path, value in signals.items():
            signal = SIGNALS.get(path)
            if signal is None:
                raise StateError(f"unknown VSS signal {path!r}")
            changes[signal.field] = parse_signal(signal, value)
        return replace(self, **changes)

    def to_signals(self) -> dict[str, Any]:
        """The known values as ``{VSS path: value}`` (the inverse of `from_signals`)."""
        return {
            s.path: getattr(self, s.field)
            for s in SIGNALS.values()
            if getattr(self, s.field) is not None
        }

    @property
    def parked(self) -> bool:
        """Park selected or the park lock engaged, not moving and speed 0 (all known)."""
        park = self.selected_gear == GEAR_PARK or self.park_lock_engaged is True
        return park and self.is_moving is False and self.speed_kmh == 0.0


assert {s.field for s in SIGNALS.values()} == {f.name for f in fields(VehicleState)}


def parse_signal(signal: Signal, value: Any) -> Any:
    """Check one raw value against its signal's type and range; return it in field form."""
    where = f"{signal.path} = {value!r}"
    if value is None:
        return None  # "not available" is a legal reading: the field becomes unknown
    if signal.kind == "bool":
        if not isinstance(value, bool):
            raise StateError(f"{where}: expected true or false")
        return value
    if signal.kind == "enum":
        if value not in signal.allowed:
            raise StateError(f"{where}: expected one of {', '.join(signal.allowed)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StateError(f"{where}: expected a number")
    if not _finite(value):
        raise StateError(f"{where}: expected a finite number")
    if signal.kind == "int" and value != int(value):
        raise StateError(f"{where}: expected a whole number")
    if (signal.minimum is not None and value < signal.minimum) or (
        signal.maximum is not None and value > signal.maximum
    ):
        low = "" if signal.minimum is None else f"{signal.minimum:g}"
        high = "" if signal.maximum is None else f"{signal.maximum:g}"
        raise StateError(f"{where}: outside {low}..{high} {signal.unit}".rstrip())
    return int(value) if signal.kind == "int" else float(value)


def _finite(value: float) -> bool:
    """``math.isfinite``, also for an integer too large for a float (a hostile or corrupt
    reading, which must make the reading unreadable rather than raise)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class StateReading:
    """What a state source delivers: the merged state, or why it cannot be read.

    ``state`` holds the last valid value of every signal even when ``error`` is set, for
    display; the policy guard must not allow work while ``error`` is not None.
    """

    state: VehicleState
    at: float
    """When the reading was taken, in the source's clock (seconds since the epoch)."""
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.error is None


class StateAssembler:
    """Merges partial signal updates into a full state and tracks which signals are broken.

    Not thread-safe: a source that feeds it from several threads must hold a lock around
    each call and the delivery of its reading.

    Sources that deliver only changed signals (KUKSA subscriptions, traces) feed this; a
    signal with an invalid value keeps the reading unreadable until a valid value for the same
    path replaces it. A lost connection is reported with `lost`.
    """

    def __init__(self, initial: VehicleState | None = None) -> None:
        self._state = initial or VehicleState()
        self._broken: dict[str, str] = {}
        self._lost: str | None = None

    def apply(self, updates: Mapping[str, Any], at: float) -> StateReading:
        self._lost = None
        valid: dict[str, Any] = {}
        unknown = []
        for path, value in updates.items():
            signal = SIGNALS.get(path)
            if signal is None:
                # Not a signal we read, so it cannot go stale: refuse it in this reading only.
                unknown.append(f"unknown VSS signal {path!r}")
                continue
            try:
                valid[signal.field] = parse_signal(signal, value)
            except StateError as exc:
                self._broken[path] = str(exc)
            else:
                self._broken.pop(path, None)
        self._state = replace(self._state, **valid)
        return self.reading(at, unknown)

    def lost(self, why: str, at: float) -> StateReading:
        """The source can no longer read the car (disconnected, crashed)."""
        self._lost = why
        return self.reading(at)

    def reading(self, at: float, extra: list[str] | None = None) -> StateReading:
        problems = ([self._lost] if self._lost else []) + sorted(self._broken.values())
        problems += extra or []
        return StateReading(self._state, at, "; ".join(problems) if problems else None)
