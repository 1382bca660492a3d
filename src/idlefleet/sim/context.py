"""What every chunk of a run shares: the weather, the policy rules as times of day, the tables.

Built once per run from the parameters and the seed, so chunks simulated in different processes
see the same week: each region's daily temperature, the allowed intervals of every
(policy profile, region) pair on every day, the thermal derating, and per-class lookup arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idlefleet.sim.params import SimParams
from idlefleet.sim.rules import DAY_MIN, Weather, allowed_intervals

__all__ = ["FleetContext", "build_context", "chunk_rng"]


@dataclass(frozen=True)
class FleetContext:
    params: SimParams
    weather: tuple[tuple[Weather, ...], ...]
    """``weather[day][region]``."""
    allowed_start: np.ndarray
    """(days, profiles × regions, m) float32 starts of allowed intervals, padded with 1440."""
    allowed_end: np.ndarray
    derate: np.ndarray
    """(days, regions): thermal throttling of sustained throughput that day."""
    tops: np.ndarray
    sustained: np.ndarray
    compute_kw: np.ndarray
    charging_only: np.ndarray
    floor_fraction: np.ndarray
    cap_kwh: np.ndarray
    utc_offset_min: np.ndarray

    @property
    def regions(self) -> int:
        return len(self.params.regions)


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The random stream of chunk ``chunk``: independent of how chunks are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, chunk)))


def build_context(params: SimParams) -> FleetContext:
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0,)))
    th = params.thermal
    weather = tuple(
        tuple(
            Weather(
                r.ambient_mean_c + th.day_sd_c * float(rng.standard_normal()), r.ambient_swing_c
            )
            for r in params.regions
        )
        for _ in range(params.days)
    )
    tables = [
        [
            allowed_intervals(p.policy, weather[d][r], th.battery_rise_c, th.chip_idle_rise_c)
            for p in params.policies
            for r in range(len(params.regions))
        ]
        for d in range(params.days)
    ]
    width = max(1, *(len(ivs) for day in tables for ivs in day))
    start = np.full((params.days, len(tables[0]), width), DAY_MIN, np.float32)
    end = np.full_like(start, DAY_MIN)
    for d, day in enumerate(tables):
        for c, ivs in enumerate(day):
            for i, (lo, hi) in enumerate(ivs):
                start[d, c, i], end[d, c, i] = lo, hi
    derate = np.array(
        [
            [
                min(
                    1.0,
                    max(
                        th.min_derate, 1 - th.derate_per_c * max(0.0, w.mean_c - th.derate_start_c)
                    ),
                )
                for w in day
            ]
            for day in weather
        ]
    )
    hw = params.hardware
    pol = [p.policy for p in params.policies]
    return FleetContext(
        params=params,
        weather=weather,
        allowed_start=start,
        allowed_end=end,
        derate=derate,
        tops=np.array([h.int8_tops for h in hw]),
        sustained=np.array([h.int8_tops * h.sustained_fraction for h in hw]),
        compute_kw=np.array([h.compute_kw for h in hw]),
        charging_only=np.array([p.charging_only for p in pol]),
        floor_fraction=np.array([p.soc_floor_percent / 100 for p in pol]),
        cap_kwh=np.array(
            [np.inf if p.daily_energy_cap_kwh is None else p.daily_energy_cap_kwh for p in pol]
        ),
        utc_offset_min=np.array([round(r.utc_offset_h * 60) for r in params.regions], np.int64),
    )
