"""Cars of the fleet model as state traces, so real agents live the model's days.

Design principle 5: simulation is a state source, not a fake system. This module runs the same
vectorised model (`simulate_chunk` with recording on) for a handful of cars and writes each
car's days as an ``idlefleet-state/1`` trace of VSS signals: parked and plugged in (or not) at
home, the driver getting in and driving off at each departure, parking at each arrival, the
state of charge as the model computes it (charging, driving, the compute draw of the sessions
the model predicts) and the battery and chip temperatures of the region's weather. The car's
owner policy comes with it, with the time zone of the car's region, so the agent's guard judges
hours in the same local time as the model.

A plugged-in car reports ``IsCharging`` for as long as it is plugged in (the model's charge
session stays open at the limit and feeds the computer), so "charging only" means "plugged in".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from idlefleet.agent.sources.trace import StateTrace, TraceEvent, parked_state
from idlefleet.agent.vehicle_state import GEAR_DRIVE, GEAR_PARK
from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.sim.context import FleetContext, build_context
from idlefleet.sim.energy import charge
from idlefleet.sim.model import ChunkRecord, simulate_chunk
from idlefleet.sim.params import HardwareClass, Region, SimParams
from idlefleet.sim.population import Population
from idlefleet.sim.rules import DAY_MIN, ambient_c

__all__ = ["SimulatedCar", "region_zone", "simulated_cars"]

FIRST_MONDAY = datetime(2026, 11, 23)
"""A Monday: day 0 of a trace is this date plus the model's ``start_weekday``."""
SAMPLE_MIN = 10.0
"""How often a parked car's trace reports its state of charge and temperatures."""
_JUST_AFTER = 0.05
"""Minutes after a blocker clears at which the trace reports the state that cleared it."""

_SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
_CHARGING = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging"
_CABLE = (
    "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition.IsChargingCableConnected"
)
_BATTERY_C = "Vehicle.Powertrain.TractionBattery.Temperature.Average"
_CHIP_C = "Vehicle.ControlUnit.Inference.Health.Resources.Temperature"


@dataclass(frozen=True)
class SimulatedCar:
    """One car of the model: its trace, its owner's policy and what the model says it did."""

    index: int
    trace: StateTrace
    policy: OwnerPolicy
    hardware: HardwareClass
    region: Region
    battery_kwh: float
    sessions: tuple[tuple[float, float], ...]
    """The model's compute sessions, (start, end) in trace seconds."""
    trips: tuple[tuple[float, float], ...]
    """The model's trips, (depart, arrive) in trace seconds."""


def region_zone(region: Region) -> str:
    """An IANA zone with the region's fixed UTC offset (``Etc/GMT+8`` is UTC-8)."""
    hours = region.utc_offset_h
    if hours != int(hours):
        raise ValueError(
            f"region {region.name}: UTC offset {hours} h has no fixed-offset IANA zone; "
            "use whole hours for traces"
        )
    return "UTC" if hours == 0 else f"Etc/GMT{-int(hours):+d}"


def simulated_cars(params: SimParams, count: int) -> list[SimulatedCar]:
    """The first ``count`` cars of chunk 0 of a run with ``params`` (opt-in as drawn)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    ctx = build_context(params)
    _, _, rec = simulate_chunk(ctx, 0, count, record=True)
    assert rec is not None
    return [_car(ctx, rec, v) for v in range(count)]


def _car(ctx: FleetContext, rec: ChunkRecord, v: int) -> SimulatedCar:
    p = ctx.params
    pop = rec.population
    region = p.regions[int(pop.region[v])]
    hardware = p.hardware[int(pop.hardware[v])]
    profile = p.policies[int(pop.profile[v])]
    policy = profile.policy.model_copy(
        update={"opted_in": bool(pop.opted_in[v]), "timezone": region_zone(region)}
    )
    cap = float(pop.battery_kwh[v])
    limit = p.charging.charge_limit_soc * cap
    eta = p.charging.efficiency
    zone = timezone(timedelta(hours=region.utc_offset_h))
    # Day 0 of the trace is the model's day 0: a Monday plus ``start_weekday`` days.
    start = FIRST_MONDAY.replace(tzinfo=zone) + timedelta(days=p.start_weekday)

    windows = sorted(w for w in rec.windows if w[0] == v)
    trips = sorted(t for t in rec.trips if t[0] == v)
    sessions = sorted(s for s in rec.sessions if s[0] == v)
    events: list[TraceEvent] = []

    def at(day: int, minute: float) -> float:
        return (day * 1440 + minute) * 60.0

    def weather(day: int, minute: float) -> dict[str, Any]:
        ambient = ambient_c(ctx.weather[day][int(pop.region[v])], minute)
        return {
            _BATTERY_C: ambient + p.thermal.battery_rise_c,
            _CHIP_C: ambient + p.thermal.chip_idle_rise_c,
        }

    def soc(kwh: float) -> float:
        return round(min(100.0, max(0.0, kwh / cap * 100)), 4)

    for _, day, t0, t1, _place, kw, e0, _e1 in windows:
        plugged = kw > 0
        continues = t0 == 0 and day > 0
        if not events:
            state = parked_state(soc(e0), plugged, plugged_in=plugged)
            events.append(TraceEvent(0.0, {**state, **weather(day, t0)}))
        elif not continues:
            events.append(
                TraceEvent(at(day, t0), {**_arrival(plugged), _SOC: soc(e0), **weather(day, t0)})
            )
        r_kw = eta * kw
        mine = [s for s in sessions if s[1] == day and t0 <= s[2] < t1]
        # State of charge along the window: charge phases in closed form, sessions linear
        # (exact when the battery falls; when it rises, the floor is not in question).
        # Besides the regular samples, report the charge where sessions start and stop and
        # just after the last blocker before each start cleared (e.g. the charge rising past
        # the floor), as a car that reports every change of its charge would.
        cleared = [s[2] - p.resume_after_min + _JUST_AFTER for s in mine]
        cleared += [b + _JUST_AFTER for b in _rule_boundaries(ctx, pop, v, day)]
        marks = sorted(
            {
                *np.arange(t0, t1, SAMPLE_MIN).tolist(),
                *(x for s in mine for x in s[2:4]),
                *(x for x in cleared if t0 < x < t1),
            }
        )
        for minute in marks:
            if minute == t0 and (not continues or events[-1].t == at(day, t0)):
                continue
            kwh = _soc_at(minute, t0, e0, mine, r_kw, limit, kw)
            events.append(TraceEvent(at(day, minute), {_SOC: soc(kwh), **weather(day, minute)}))
        trip = next((t for t in trips if t[1] == day and t[2] == t1), None)
        if trip is not None:
            events.append(TraceEvent(at(day, t1), {**_departure(), _SOC: soc(trip[4])}))
    return SimulatedCar(
        index=v,
        trace=StateTrace.from_events(start, events),
        policy=policy,
        hardware=hardware,
        region=region,
        battery_kwh=cap,
        sessions=tuple((at(s[1], s[2]), at(s[1], s[3])) for s in sessions),
        trips=tuple((at(t[1], t[2]), at(t[1], t[3])) for t in trips),
    )


def _rule_boundaries(ctx: FleetContext, pop: Population, v: int, day: int) -> list[float]:
    """Minutes where the clock- and weather-bound rules change (hours, departure, heat)."""
    combo = int(pop.profile[v]) * ctx.regions + int(pop.region[v])
    edges = {*ctx.allowed_start[day, combo].tolist(), *ctx.allowed_end[day, combo].tolist()}
    return sorted(edges - {0.0, DAY_MIN})


def _soc_at(
    minute: float,
    t0: float,
    e0: float,
    sessions: list[tuple[int, int, float, float, float, float]],
    r_kw: float,
    limit: float,
    kw: float,
) -> float:
    t, e = t0, e0
    for _, _, start, stop, e_start, e_stop in sessions:
        if minute < start:
            break
        if minute <= stop:
            share = (minute - start) / (stop - start) if stop > start else 1.0
            return e_start + (e_stop - e_start) * share
        t, e = stop, e_stop
    kwh, _ = charge(
        np.array([e]), np.array([minute - t]), np.array([r_kw]), np.array([limit]), np.array([kw])
    )
    return float(kwh[0])


def _arrival(plugged: bool) -> dict[str, Any]:
    return {
        "Vehicle.Speed": 0.0,
        "Vehicle.IsMoving": False,
        "Vehicle.Powertrain.Transmission.SelectedGear": GEAR_PARK,
        "Vehicle.Powertrain.Transmission.IsParkLockEngaged": True,
        "Vehicle.LowVoltageSystemState": "OFF",
        "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "EMPTY",
        _CHARGING: plugged,
        _CABLE: plugged,
    }


def _departure() -> dict[str, Any]:
    return {
        _CHARGING: False,
        _CABLE: False,
        "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "OCCUPIED",
        "Vehicle.LowVoltageSystemState": "ON",
        "Vehicle.Powertrain.Transmission.SelectedGear": GEAR_DRIVE,
        "Vehicle.Powertrain.Transmission.IsParkLockEngaged": False,
        "Vehicle.Speed": 30.0,
        "Vehicle.IsMoving": True,
    }
