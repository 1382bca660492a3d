"""The policy guard: may this car compute right now, and if not, why not.

Two layers, both pure (no clocks, threads or I/O; time comes in as an argument):

* `blockers(reading, policy, now, energy_today_kwh)` lists every condition that forbids
  compute at this instant. The safety invariants come first and no policy can switch them off:
  the state must be readable; the car must be parked (Park selected or the park lock engaged,
  not moving, speed 0); the low-voltage system must not be in START; the driver seat must not
  be occupied. The owner's policy adds opt-in, charging, state-of-charge floor, temperature
  ceilings, allowed hours, the expected departure and the daily energy cap.
* `PolicyGuard` adds hysteresis on top, as BOINC's Android client does: after any blocker, work
  resumes only once no blocker has been seen for ``resume_after_s`` (five minutes by default),
  so a car whose charger flickers or whose owner opens the door twice does not flap. Stopping
  is never delayed.

A signal the policy needs but the car does not report counts as a blocker: a limit we cannot
check is a limit we cannot promise to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from idlefleet.agent.vehicle_state import StateReading
from idlefleet.protocol.policy import OwnerPolicy

__all__ = ["DEFAULT_RESUME_AFTER_S", "SAFETY_REASONS", "PolicyGuard", "Verdict", "blockers"]

DEFAULT_RESUME_AFTER_S = 300.0

SAFETY_REASONS = frozenset(
    {"state_unreadable", "not_parked", "moving", "speed", "starting", "driver_present"}
)
"""Blockers that hold whatever the owner's policy says."""


@dataclass(frozen=True)
class Verdict:
    """The guard's answer: allowed, or the reasons why not (codes and a readable sentence)."""

    allowed: bool
    reasons: tuple[str, ...] = ()
    detail: str = ""

    def summary(self) -> str:
        return "allowed" if self.allowed else ", ".join(self.reasons)


def blockers(
    reading: StateReading | None,
    policy: OwnerPolicy,
    now: float,
    energy_today_kwh: float = 0.0,
) -> list[tuple[str, str]]:
    """Every condition that forbids compute at ``now``, as (code, explanation) pairs."""
    found: list[tuple[str, str]] = []
    if reading is None:
        return [("state_unreadable", "no reading from the car yet")]
    if reading.error is not None:
        found.append(("state_unreadable", f"car state unreadable: {reading.error}"))
    s = reading.state
    park = s.selected_gear == 126 or s.park_lock_engaged is True
    if not park:
        found.append(("not_parked", f"gear {s.selected_gear}, park lock {s.park_lock_engaged}"))
    if s.is_moving is not False:
        found.append(("moving", f"IsMoving is {s.is_moving}"))
    if s.speed_kmh != 0.0:
        found.append(("speed", f"speed {s.speed_kmh} km/h"))
    if s.low_voltage_state in (None, "START"):
        found.append(("starting", f"low-voltage system state {s.low_voltage_state}"))
    if s.driver_seat != "EMPTY":
        found.append(("driver_present", f"driver seat {s.driver_seat}"))

    if not policy.opted_in:
        found.append(("opted_out", "the owner has not opted in"))
    if policy.charging_only and s.is_charging is not True:
        found.append(("not_charging", f"charging only, IsCharging is {s.is_charging}"))
    if s.soc_percent is None or s.soc_percent <= policy.soc_floor_percent:
        found.append(
            ("soc_floor", f"state of charge {s.soc_percent} <= floor {policy.soc_floor_percent}")
        )
    if s.battery_temp_c is None or s.battery_temp_c > policy.max_battery_temp_c:
        found.append(
            (
                "battery_hot",
                f"battery {s.battery_temp_c} °C > ceiling {policy.max_battery_temp_c} °C",
            )
        )
    if s.chip_temp_c is None or s.chip_temp_c > policy.max_chip_temp_c:
        found.append(
            ("chip_hot", f"inference chip {s.chip_temp_c} °C > ceiling {policy.max_chip_temp_c} °C")
        )
    local = policy.local(now)
    if policy.allowed_hours and not _in_any_window(local.time(), policy.hour_windows()):
        found.append(("outside_hours", f"{local:%H:%M} is outside {policy.allowed_hours}"))
    if policy.departure_time is not None and _before_departure(local, policy):
        found.append(
            (
                "departure_soon",
                f"departure at {policy.departure_time}, stop "
                f"{policy.stop_before_departure_min} min before",
            )
        )
    cap = policy.daily_energy_cap_kwh
    if cap is not None and energy_today_kwh >= cap:
        found.append(("energy_cap", f"used {energy_today_kwh:.3f} of {cap} kWh today"))
    return found


def _in_any_window(t: time, windows: list[tuple[time, time]]) -> bool:
    for start, end in windows:
        inside = start <= t < end if start < end else (t >= start or t < end)
        if inside:
            return True
    return False


def _before_departure(local: datetime, policy: OwnerPolicy) -> bool:
    """Within ``stop_before_departure_min`` before the next expected departure."""
    assert policy.departure_time is not None
    hour, minute = (int(x) for x in policy.departure_time.split(":"))
    margin = timedelta(minutes=policy.stop_before_departure_min)
    # Compare in naive local wall time so a DST change does not shift the departure.
    wall = local.replace(tzinfo=None)
    for day in (wall.date(), wall.date() + timedelta(days=1)):
        departure = datetime(day.year, day.month, day.day, hour, minute)
        if departure - margin <= wall < departure:
            return True
    return False


class PolicyGuard:
    """Blockers plus hysteresis; call `observe` on every reading and periodically in between.

    Not thread-safe by itself: the `ComputeGate` serialises calls.
    """

    def __init__(self, policy: OwnerPolicy, resume_after_s: float = DEFAULT_RESUME_AFTER_S):
        if not 0 <= resume_after_s <= 86_400:
            raise ValueError("resume_after_s must be between 0 and 86400 seconds")
        self.policy = policy
        self.resume_after_s = resume_after_s
        self._clear_since: float | None = None
        self._allowed = False

    def observe(
        self, reading: StateReading | None, now: float, energy_today_kwh: float = 0.0
    ) -> Verdict:
        found = blockers(reading, self.policy, now, energy_today_kwh)
        if found:
            self._clear_since = None
            self._allowed = False
            return Verdict(
                False, tuple(code for code, _ in found), "; ".join(why for _, why in found)
            )
        if self._clear_since is None or now < self._clear_since:
            self._clear_since = now  # (a clock that went backwards restarts the wait)
        waited = now - self._clear_since
        if self._allowed or waited >= self.resume_after_s:
            self._allowed = True
            return Verdict(True)
        return Verdict(
            False,
            ("settling",),
            f"conditions have held for {waited:.0f} of {self.resume_after_s:.0f} s",
        )
