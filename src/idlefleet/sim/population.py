"""The cars of one chunk: what does not change from day to day, drawn once per vehicle.

Hardware class, battery, region, whether the owner commutes and has chargers at home and at
work, which policy profile the owner chose and whether they opted in. Arrays, one entry per
vehicle, so the day model works on whole chunks at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idlefleet.sim.params import SimParams

__all__ = ["Population", "sample_population"]


@dataclass(frozen=True)
class Population:
    hardware: np.ndarray
    """Index into ``params.hardware`` (int8)."""
    region: np.ndarray
    """Index into ``params.regions`` (int8)."""
    profile: np.ndarray
    """Index into ``params.policies`` (int8)."""
    opted_in: np.ndarray
    commuter: np.ndarray
    battery_kwh: np.ndarray
    home_kw: np.ndarray
    """Home charger power; 0 for owners without one."""
    work_kw: np.ndarray
    """Charger power at work; 0 for non-commuters and commuters without one."""
    initial_kwh: np.ndarray

    @property
    def size(self) -> int:
        return int(self.hardware.shape[0])


def _choice(rng: np.random.Generator, shares: list[float], n: int) -> np.ndarray:
    """Indices drawn with probabilities ``shares`` (already validated to add up to 1)."""
    # Counting the cumulative edges below a uniform draw: for a handful of classes this is
    # several times faster than a search.
    edges = np.cumsum(shares, dtype=np.float64)[:-1].astype(np.float32)
    u = rng.random(n, dtype=np.float32)
    index = np.zeros(n, np.int8)
    for edge in edges:
        index += u >= edge
    return index


def sample_population(rng: np.random.Generator, n: int, params: SimParams) -> Population:
    ch = params.charging
    hardware = _choice(rng, [h.share for h in params.hardware], n)
    region = _choice(rng, [r.share for r in params.regions], n)
    profile = _choice(rng, [p.share for p in params.policies], n)
    opted_in = rng.random(n) < params.opt_in_rate
    commuter = rng.random(n) < params.travel.commuter_share
    battery = np.asarray(ch.battery_kwh)[_choice(rng, list(ch.battery_share), n)]
    home_kw = np.where(rng.random(n) < ch.home_charger_share, ch.home_charger_kw, 0.0)
    has_work = commuter & (rng.random(n) < ch.work_charger_share)
    work_kw = np.where(has_work, ch.work_charger_kw, 0.0)
    low, high = ch.initial_soc
    initial = battery * rng.uniform(low, high, n)
    return Population(
        hardware=hardware,
        region=region,
        profile=profile,
        opted_in=opted_in,
        commuter=commuter,
        battery_kwh=battery,
        home_kw=home_kw,
        work_kw=work_kw,
        initial_kwh=initial,
    )
