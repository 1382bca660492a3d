"""What a run adds up: time series, totals and histograms, mergeable across chunks.

A chunk returns a `Tally`; chunks from any number of processes merge by addition, so the
result does not depend on how the fleet was split. Time series are kept as difference arrays
over the simulated period in UTC minutes (each interval adds its weight at its start and
subtracts it at its end; the period wraps round, so the week repeats), and turned into levels
only once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

__all__ = [
    "EARNINGS_EDGES",
    "LENGTH_EDGES",
    "SERIES",
    "Tally",
    "length_bins",
]

SERIES = (
    "parked_vehicles",
    "plugged_vehicles",
    "parked_int8_tops_peak",
    "opted_in_parked_int8_tops_peak",
    "computing_vehicles",
    "computing_int8_tops_peak",
    "computing_int8_tops_sustained",
    "compute_kw",
)
"""Time series, in this order; TOPS are INT8 tera-operations per second."""

LENGTH_EDGES = np.concatenate([[0.0], np.geomspace(1, 20160, 61)])
"""Bins of window lengths in minutes: [0, 1) then 60 log-spaced bins from 1 minute to 14 days."""
_LOG_LO, _LOG_STEP = 0.0, np.log(20160) / 60

EARNINGS_EDGES = np.arange(-20.0, 500.5, 1.0)
"""Bins of an opted-in owner's monthly net earnings in USD (outside: clipped to the end bins)."""


def length_bins(minutes: np.ndarray) -> np.ndarray:
    """Bin index in `LENGTH_EDGES` of each length (fast: arithmetic, not a search)."""
    with np.errstate(divide="ignore"):
        idx = np.floor((np.log(np.maximum(minutes, 1e-9)) - _LOG_LO) / _LOG_STEP) + 1
    return np.clip(np.where(minutes < 1, 0, idx), 0, len(LENGTH_EDGES) - 2).astype(np.int64)


@dataclass
class Tally:
    period_min: int
    series: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """(series, minute + 1) difference arrays; sized from ``period_min`` when left empty."""
    session_hist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    parked_hist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    earnings_hist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vehicles: float = 0.0
    vehicle_days: float = 0.0
    opted_in_vehicles: float = 0.0
    trips: float = 0.0
    drive_min: float = 0.0
    parked_min: float = 0.0
    plugged_min: float = 0.0
    compute_min: float = 0.0
    tops_min: float = 0.0
    parked_tops_min: float = 0.0
    opted_parked_tops_min: float = 0.0
    computing_tops_min: float = 0.0
    sustained_tops_min: float = 0.0
    drive_kwh: float = 0.0
    grid_kwh: float = 0.0
    fast_grid_kwh: float = 0.0
    compute_kwh: float = 0.0
    fast_charges: float = 0.0
    sessions: float = 0.0
    ended_departure: float = 0.0
    ended_hours: float = 0.0
    ended_floor: float = 0.0
    ended_cap: float = 0.0
    revenue_usd: float = 0.0
    payout_usd: float = 0.0
    electricity_usd: float = 0.0

    def __post_init__(self) -> None:
        if not self.series.size:
            self.series = np.zeros((len(SERIES), self.period_min + 1))
        if not self.session_hist.size:
            self.session_hist = np.zeros(len(LENGTH_EDGES) - 1)
        if not self.parked_hist.size:
            self.parked_hist = np.zeros(len(LENGTH_EDGES) - 1)
        if not self.earnings_hist.size:
            self.earnings_hist = np.zeros(len(EARNINGS_EDGES) - 1)

    def merge(self, other: Tally) -> Tally:
        """Add ``other`` into this tally (same period) and return self."""
        if other.period_min != self.period_min:
            raise ValueError("tallies of different periods cannot be merged")
        for f in fields(self):
            if f.name != "period_min":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def levels(self) -> np.ndarray:
        """(series, minute) levels over the period, from the difference arrays."""
        return np.cumsum(self.series, axis=1)[:, : self.period_min]
