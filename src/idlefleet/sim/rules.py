"""The owner-policy rules of the car's guard, as times of day, for the vectorised model.

The car's `policy_guard.blockers` judges one reading at one instant. The fleet model cannot call
it for millions of cars each minute, so it asks the same rules a different question: *during
which minutes of a local day* may this policy compute, given the region's temperature that day?
Allowed hours, the stop before a declared departure, and the battery and chip temperature
ceilings depend only on the clock and the weather, so they become a short list of allowed
intervals of the day; the rules that depend on the car's own state (opt-in, charging, the
state-of-charge floor, the daily energy cap, hysteresis) are applied by the model as it follows
each car's charge through a parked window. A test holds these intervals to ``blockers`` minute
by minute, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from idlefleet.protocol.policy import OwnerPolicy

__all__ = ["DAY_MIN", "Interval", "allowed_intervals", "ambient_c", "hot_interval", "subtract"]

DAY_MIN = 1440.0
PEAK_HOUR = 15.0
"""The warmest hour of the day in the model's sinusoidal temperature profile."""

Interval = tuple[float, float]
"""[start, end) in minutes of the local day, 0 <= start < end <= 1440."""


@dataclass(frozen=True)
class Weather:
    """A region's day: mean and half-swing of the ambient temperature in °C."""

    mean_c: float
    swing_c: float


def ambient_c(weather: Weather, minute: float) -> float:
    """The model's ambient temperature at ``minute`` of the local day (warmest at 15:00)."""
    angle = 2 * math.pi * (minute / 60 - PEAK_HOUR) / 24
    return weather.mean_c + weather.swing_c * math.cos(angle)


def _split(start: float, end: float) -> list[Interval]:
    """A clock window that may cross midnight, as intervals of one day."""
    start, end = start % DAY_MIN, end % DAY_MIN
    if start < end:
        return [(start, end)]
    return [iv for iv in ((start, DAY_MIN), (0.0, end)) if iv[0] < iv[1]]


def _merge(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def subtract(allowed: list[Interval], blocked: list[Interval]) -> list[Interval]:
    """``allowed`` minus ``blocked`` (both lists of half-open intervals), sorted and merged."""
    result = _merge(allowed)
    for b_start, b_end in _merge(blocked):
        pieces: list[Interval] = []
        for start, end in result:
            if b_end <= start or b_start >= end:
                pieces.append((start, end))
                continue
            if start < b_start:
                pieces.append((start, b_start))
            if b_end < end:
                pieces.append((b_end, end))
        result = pieces
    return result


def hot_interval(weather: Weather, limit_c: float) -> list[Interval]:
    """Minutes when ``ambient + rise`` exceeds a ceiling, given as ``limit_c`` = ceiling - rise.

    The guard blocks on ``temperature > ceiling``; the sinusoid exceeds ``limit_c`` in one
    window centred on the warmest hour (possibly the whole day, possibly never).
    """
    if weather.swing_c == 0:
        return [(0.0, DAY_MIN)] if weather.mean_c > limit_c else []
    x = (limit_c - weather.mean_c) / weather.swing_c
    if x >= 1:
        return []
    if x < -1:
        return [(0.0, DAY_MIN)]
    half_h = math.acos(x) * 24 / (2 * math.pi)
    return (
        _split((PEAK_HOUR - half_h) * 60, (PEAK_HOUR + half_h) * 60)
        if half_h < 12
        else [(0.0, DAY_MIN)]
    )


def allowed_intervals(
    policy: OwnerPolicy,
    weather: Weather,
    battery_rise_c: float,
    chip_idle_rise_c: float,
) -> list[Interval]:
    """Minutes of the local day when the clock- and weather-bound rules allow compute.

    Those rules are: ``allowed_hours``, ``departure_time`` with ``stop_before_departure_min``,
    ``max_battery_temp_c`` (battery at ambient + ``battery_rise_c``) and ``max_chip_temp_c``
    (chip at ambient + ``chip_idle_rise_c`` before it starts).
    """
    if policy.allowed_hours:
        hours: list[Interval] = []
        for start, end in policy.hour_windows():
            hours += _split(start.hour * 60 + start.minute, end.hour * 60 + end.minute)
    else:
        hours = [(0.0, DAY_MIN)]
    blocked: list[Interval] = []
    if policy.departure_time is not None:
        hh, mm = (int(x) for x in policy.departure_time.split(":"))
        departure = hh * 60 + mm
        margin = policy.stop_before_departure_min
        if margin >= DAY_MIN:
            blocked.append((0.0, DAY_MIN))
        elif margin > 0:
            blocked += _split(departure - margin, departure)
    blocked += hot_interval(weather, policy.max_battery_temp_c - battery_rise_c)
    blocked += hot_interval(weather, policy.max_chip_temp_c - chip_idle_rise_c)
    return subtract(hours, blocked)
