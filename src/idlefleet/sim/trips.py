"""One day of trip chains for every car of a chunk, as arrays.

A day runs from local midnight to midnight and every car starts and ends it at home, so days
chain without loose ends (a tour that would come home after midnight is dropped, as are the
tours after it). A day is up to three home-based tours (home → somewhere → home):

* a commuter's working day: to work in the morning, home in the evening, perhaps one evening
  errand tour;
* any other day: nothing (stay at home), or one to three errand tours from late morning.

Trip durations are log-normal, work departures and dwells normal, errand dwells log-normal and
the time at home between tours exponential: the shapes of travel surveys (NHTS), with the
parameters in `TravelParams`. The result is a fixed-width table: six trips and the seven parked
windows around them (home, stop, home, stop, home, stop, home). Trips of dropped tours have
zero length at minute 1440, so the windows around them are empty and need no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idlefleet.sim.params import TravelParams

__all__ = ["HOME", "MAX_TOURS", "PUBLIC", "WINDOWS", "WORK", "DayPlan", "sample_day"]

MAX_TOURS = 3
WINDOWS = 2 * MAX_TOURS + 1
HOME, WORK, PUBLIC = 0, 1, 2
_END = np.float32(1440.0)
_LATEST_RETURN = np.float32(1439.0)


@dataclass(frozen=True)
class DayPlan:
    """Trip ``k`` leaves at ``depart[:, k]`` and arrives at ``arrive[:, k]`` (minutes, float32).

    Parked window ``j`` runs from ``arrive[:, j-1]`` (0 for j = 0) to ``depart[:, j]`` (1440 for
    the last) at ``place[:, j]`` (HOME, WORK or PUBLIC).
    """

    depart: np.ndarray
    arrive: np.ndarray
    place: np.ndarray

    @property
    def window_start(self) -> np.ndarray:
        n = self.depart.shape[0]
        return np.concatenate([np.zeros((n, 1), np.float32), self.arrive], axis=1)

    @property
    def window_end(self) -> np.ndarray:
        n = self.depart.shape[0]
        return np.concatenate([self.depart, np.full((n, 1), _END, np.float32)], axis=1)

    @property
    def trip_minutes(self) -> np.ndarray:
        return self.arrive - self.depart


def _lognormal(
    rng: np.random.Generator, shape: tuple[int, ...], median: float, sigma: float
) -> np.ndarray:
    z = rng.standard_normal(shape, dtype=np.float32)
    return np.float32(median) * np.exp(np.float32(sigma) * z)


def _normal(rng: np.random.Generator, n: int, mean: float, sd: float) -> np.ndarray:
    return np.float32(mean) + np.float32(sd) * rng.standard_normal(n, dtype=np.float32)


def sample_day(
    rng: np.random.Generator, commuter: np.ndarray, weekend: bool, travel: TravelParams
) -> DayPlan:
    """Trip chains for one day of every car; ``commuter`` marks the cars whose owners commute."""
    n = commuter.shape[0]
    f32 = np.float32
    work_prob = travel.weekend_work_prob if weekend else travel.work_day_prob
    works = commuter & (rng.random(n, dtype=f32) < work_prob)
    stay_prob = travel.stay_home_weekend if weekend else travel.stay_home_weekday
    u = rng.random(n, dtype=f32)
    p1, p2, _ = travel.tours_1_2_3
    s = f32(stay_prob)
    errand_tours = np.where(
        u < s,
        0,
        np.where(u < s + (1 - s) * f32(p1), 1, np.where(u < s + (1 - s) * f32(p1 + p2), 2, 3)),
    )
    evening = rng.random(n, dtype=f32) < travel.evening_tour_prob
    tours = np.where(works, 1 + evening, errand_tours)

    first = np.where(
        works,
        np.clip(
            _normal(rng, n, travel.commute_depart_h * 60, travel.commute_depart_sd_h * 60), 240, 720
        ),
        np.clip(
            _normal(rng, n, travel.errand_depart_h * 60, travel.errand_depart_sd_h * 60), 360, 1200
        ),
    )
    errand_trip = _lognormal(
        rng, (n, 2 * MAX_TOURS), travel.errand_trip_median_min, travel.errand_trip_sigma
    )
    commute_trip = _lognormal(
        rng, (n, 2), travel.commute_trip_median_min, travel.commute_trip_sigma
    )
    trip = np.clip(errand_trip, 2, 180)
    trip[:, :2] = np.where(works[:, None], np.clip(commute_trip, 3, 180), trip[:, :2])
    dwell = np.clip(
        _lognormal(rng, (n, MAX_TOURS), travel.errand_dwell_median_min, travel.errand_dwell_sigma),
        5,
        600,
    )
    work_dwell = np.clip(
        _normal(rng, n, travel.work_dwell_h * 60, travel.work_dwell_sd_h * 60), 120, 720
    )
    dwell[:, 0] = np.where(works, work_dwell, dwell[:, 0])
    gap = f32(30) + f32(travel.home_gap_mean_min - 30 if travel.home_gap_mean_min > 30 else 0) * (
        rng.standard_exponential((n, MAX_TOURS - 1), dtype=f32)
    )

    depart = np.empty((n, 2 * MAX_TOURS), f32)
    arrive = np.empty((n, 2 * MAX_TOURS), f32)
    place = np.zeros((n, WINDOWS), np.int8)
    valid = np.ones(n, bool)
    leave = first
    for k in range(MAX_TOURS):
        out, back = 2 * k, 2 * k + 1
        reach = leave + trip[:, out]
        leave_back = reach + dwell[:, k]
        home = leave_back + trip[:, back]
        valid &= (tours > k) & (home <= _LATEST_RETURN)
        depart[:, out] = np.where(valid, leave, _END)
        arrive[:, out] = np.where(valid, reach, _END)
        depart[:, back] = np.where(valid, leave_back, _END)
        arrive[:, back] = np.where(valid, home, _END)
        place[:, out + 1] = PUBLIC if k else np.where(works, WORK, PUBLIC)
        if k + 1 < MAX_TOURS:
            leave = home + gap[:, k]
    return DayPlan(depart=depart, arrive=arrive, place=place)
