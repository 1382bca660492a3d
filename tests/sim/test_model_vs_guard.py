"""The vectorised model against the car's own guard: same rules, same minutes.

The fleet model never calls `blockers`; it follows each car's charge through a parked window in
closed form. Here a few dozen cars of a deliberately awkward fleet (hot region, weak chargers,
allowed hours across midnight and in pieces, a declared departure, a small energy cap) are
turned into state traces, replayed reading by reading into the real `PolicyGuard` every 30
seconds, and the minutes the guard allows are compared with the model's compute sessions.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from idlefleet.agent.policy_guard import PolicyGuard
from idlefleet.agent.vehicle_state import StateAssembler, StateReading
from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.sim.params import PolicyProfile, Region, SimParams
from idlefleet.sim.trace import SimulatedCar, simulated_cars

STEP_S = 30.0

AWKWARD = SimParams.build(
    vehicles=80,
    days=3,
    seed=11,
    opt_in_rate=0.9,
    regions=[
        Region(name="desert", share=0.5, utc_offset_h=4, ambient_mean_c=36, ambient_swing_c=9),
        Region(name="east", share=0.5, utc_offset_h=-5, ambient_mean_c=12, ambient_swing_c=6),
    ],
    policies=[
        PolicyProfile(name="cautious", share=0.2, policy=OwnerPolicy()),
        PolicyProfile(name="night", share=0.2, policy=OwnerPolicy(allowed_hours=["22:00-06:00"])),
        PolicyProfile(
            name="pieces",
            share=0.2,
            policy=OwnerPolicy(
                charging_only=False,
                soc_floor_percent=30,
                allowed_hours=["00:00-05:00", "12:00-14:30", "20:00-23:30"],
            ),
        ),
        PolicyProfile(
            name="departs",
            share=0.2,
            policy=OwnerPolicy(departure_time="07:30", stop_before_departure_min=45),
        ),
        PolicyProfile(
            name="capped",
            share=0.2,
            policy=OwnerPolicy(charging_only=False, soc_floor_percent=40, daily_energy_cap_kwh=3),
        ),
    ],
    charging={"home_charger_kw": 1.4, "plug_habit": 0.7},
)


def guard_minutes(car: SimulatedCar, days: int, resume_min: float) -> tuple[np.ndarray, set[str]]:
    """Replay the car's trace into the real guard; (allowed per step, every reason seen)."""
    guard = PolicyGuard(car.policy, resume_after_s=resume_min * 60)
    assembler = StateAssembler()
    events = list(car.trace.events)
    steps = int(days * 86_400 / STEP_S)
    allowed = np.zeros(steps, bool)
    reasons: set[str] = set()
    reading: StateReading | None = None
    next_event, energy_kwh, today = 0, 0.0, None
    for i in range(steps):
        now = car.trace.start + i * STEP_S
        while next_event < len(events) and car.trace.start + events[next_event].t <= now:
            event = events[next_event]
            reading = assembler.apply(event.signals, car.trace.start + event.t)
            next_event += 1
        local_day = car.policy.local(now).date()
        if local_day != today:
            today, energy_kwh = local_day, 0.0  # the agent's meter resets at local midnight
        verdict = guard.observe(reading, now, energy_kwh)
        allowed[i] = verdict.allowed
        reasons.update(verdict.reasons)
        if verdict.allowed:
            energy_kwh += car.hardware.compute_kw * STEP_S / 3600
    return allowed, reasons


def model_minutes(car: SimulatedCar, steps: int) -> np.ndarray:
    computing = np.zeros(steps, bool)
    for start, end in car.sessions:
        computing[int(np.ceil(start / STEP_S)) : int(np.ceil(end / STEP_S))] = True
    return computing


@pytest.fixture(scope="module")
def replayed() -> list[tuple[SimulatedCar, np.ndarray, np.ndarray, set[str]]]:
    out = []
    for car in simulated_cars(AWKWARD, AWKWARD.vehicles):
        allowed, reasons = guard_minutes(car, AWKWARD.days, AWKWARD.resume_after_min)
        out.append((car, allowed, model_minutes(car, allowed.size), reasons))
    return out


def test_the_guard_allows_the_minutes_the_model_computes(replayed) -> None:
    # Arrange: per car, minutes where the two disagree, per start or end of a model session.
    # The replay steps every 30 s and the guard's energy count grows by steps, so each
    # boundary may be off by up to two steps; anything systematic would be far larger.
    per_boundary = [
        np.count_nonzero(g != m) * STEP_S / 60 / max(1, 2 * len(car.sessions))
        for car, g, m, _ in replayed
    ]
    model_total = sum(np.count_nonzero(m) for _, _, m, _ in replayed)
    guard_total = sum(np.count_nonzero(g) for _, g, _, _ in replayed)

    # Assert: the model computed a lot, and within a minute per session edge of the guard.
    assert model_total * STEP_S / 3600 > 500  # hours of compute over the fleet
    assert abs(model_total - guard_total) / model_total < 0.002
    assert max(per_boundary) <= 1.0, sorted(per_boundary)[-5:]


def test_the_fleet_exercises_every_rule_the_model_reproduces(replayed) -> None:
    seen = set().union(*(reasons for *_, reasons in replayed))
    expected = {
        "opted_out",
        "not_charging",
        "soc_floor",
        "battery_hot",
        "outside_hours",
        "departure_soon",
        "energy_cap",
        "not_parked",
        "driver_present",
        "settling",
    }
    assert expected <= seen, expected - seen


def test_trips_in_the_trace_are_the_model_trips(replayed) -> None:
    for car, guard, _, _ in replayed:
        for depart, arrive in car.trips:
            inside = slice(int(np.ceil(depart / STEP_S)), int(np.floor(arrive / STEP_S)))
            assert not guard[inside].any(), f"car {car.index} computed while driving"


def test_a_trace_starts_on_the_model_weekday_at_local_midnight() -> None:
    params = SimParams.build(start_weekday=5, days=1, opt_in_rate=1.0)
    (car,) = simulated_cars(params, 1)
    local = datetime.fromtimestamp(car.trace.start, car.policy.zone())
    assert (local.weekday(), local.hour, local.minute) == (5, 0, 0)
