"""Run the fleet model over any number of cars: fixed-size chunks, spread over processes.

Memory is bounded by the chunk size, not the fleet: each chunk is simulated on its own and
returns only its `Tally` (sums, histograms, difference arrays of the time series), which merge
by addition. Chunk ``k`` always draws from the same random stream, so a run gives the same
numbers on one process or many. `SimResult` turns the merged tally into the figures people
ask for (`summary`) and the time series (`timeseries`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from idlefleet.sim.context import FleetContext, build_context
from idlefleet.sim.model import simulate_chunk
from idlefleet.sim.params import SimParams
from idlefleet.sim.tally import EARNINGS_EDGES, LENGTH_EDGES, SERIES, Tally

__all__ = ["SimResult", "simulate"]

_DAYS_PER_MONTH = 365.25 / 12
_worker_ctx: FleetContext | None = None


def _init_worker(params_json: str) -> None:
    global _worker_ctx
    _worker_ctx = build_context(SimParams.model_validate_json(params_json))


def _run_chunk(chunk: int, n: int) -> Tally:
    assert _worker_ctx is not None
    return simulate_chunk(_worker_ctx, chunk, n)[0]


def _chunks(params: SimParams) -> list[tuple[int, int]]:
    size = params.chunk_vehicles
    count = math.ceil(params.vehicles / size)
    return [(k, min(size, params.vehicles - k * size)) for k in range(count)]


def simulate(
    params: SimParams,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Simulate ``params.vehicles`` cars for ``params.days`` days on ``workers`` processes.

    ``workers`` defaults to the CPU count (1 runs in this process); ``progress(done, total)``
    is called after each chunk.
    """
    chunks = _chunks(params)
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    started = time.perf_counter()
    total = Tally(period_min=params.days * 1440)
    if workers == 1:
        ctx = build_context(params)
        for done, (k, n) in enumerate(chunks, start=1):
            total.merge(simulate_chunk(ctx, k, n)[0])
            if progress:
                progress(done, len(chunks))
    else:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(params.model_dump_json(),),
        ) as pool:
            futures = [pool.submit(_run_chunk, k, n) for k, n in chunks]
            for done, future in enumerate(futures, start=1):
                total.merge(future.result())
                if progress:
                    progress(done, len(chunks))
    return SimResult(params, total, time.perf_counter() - started, workers)


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a histogram, interpolating linearly inside the bin."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, q * total))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i else 0.0
    inside = (q * total - before) / counts[i] if counts[i] else 0.0
    return float(edges[i] + inside * (edges[i + 1] - edges[i]))


@dataclass(frozen=True)
class SimResult:
    params: SimParams
    tally: Tally
    wall_s: float
    workers: int

    @property
    def vehicle_days(self) -> float:
        return self.tally.vehicle_days

    def timeseries(self) -> dict[str, np.ndarray]:
        """Levels averaged over ``bin_minutes`` bins: ``minute`` (UTC minutes since day 0's
        midnight UTC, the start of each bin) and one array per name in `SERIES`."""
        step = self.params.bin_minutes
        levels = self.tally.levels()
        binned = levels.reshape(len(SERIES), -1, step).mean(axis=2)
        out = {"minute": np.arange(binned.shape[1]) * step}
        out.update({name: binned[i] for i, name in enumerate(SERIES)})
        return out

    def factors(self) -> dict[str, float]:
        """Where the nameplate goes, TOPS-weighted so the product is exact:
        availability × opt-in × charging × thermal = mean sustained ÷ fleet peak."""
        t = self.tally
        ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
        return {
            "availability": ratio(t.parked_tops_min, t.tops_min),
            "opt_in": ratio(t.opted_parked_tops_min, t.parked_tops_min),
            "charging": ratio(t.computing_tops_min, t.opted_parked_tops_min),
            "thermal": ratio(t.sustained_tops_min, t.computing_tops_min),
        }

    def summary(self) -> dict[str, Any]:
        """Every headline figure of the run, JSON-able, grouped and named with units."""
        t, p = self.tally, self.params
        vd = t.vehicle_days
        opted_vd = t.opted_in_vehicles * p.days
        period = p.days * 1440
        per = lambda x, d: x / d if d else 0.0  # noqa: E731
        series = self.timeseries()
        sustained = series["computing_int8_tops_sustained"]
        factors = self.factors()
        months = p.days / _DAYS_PER_MONTH
        opted = t.opted_in_vehicles
        return {
            "run": {
                "vehicles": p.vehicles,
                "days": p.days,
                "vehicle_days": vd,
                "seed": p.seed,
                "wall_s": round(self.wall_s, 3),
                "workers": self.workers,
                "vehicle_days_per_s": per(vd, self.wall_s),
            },
            "calibration": {
                "parked_fraction": per(t.parked_min, vd * 1440),
                "driving_min_per_vehicle_day": per(t.drive_min, vd),
                "trips_per_vehicle_day": per(t.trips, vd),
                "plugged_fraction_of_parked": per(t.plugged_min, t.parked_min),
            },
            "compute": {
                "unit": "INT8 TOPS (tera-operations per second, 8-bit integer); no FP64 figure",
                "fleet_peak_int8_tops": t.tops_min / period,
                "mean_parked_int8_tops_peak": t.parked_tops_min / period,
                "mean_opted_in_parked_int8_tops_peak": t.opted_parked_tops_min / period,
                "mean_computing_int8_tops_peak": t.computing_tops_min / period,
                "mean_computing_int8_tops_sustained": t.sustained_tops_min / period,
                "min_computing_int8_tops_sustained": float(sustained.min()),
                "max_computing_int8_tops_sustained": float(sustained.max()),
                "mean_computing_vehicles": t.compute_min / period,
            },
            "factors": {**factors, "product": math.prod(factors.values())},
            "energy": {
                "compute_kwh_per_vehicle_day": per(t.compute_kwh, vd),
                "compute_kwh_per_opted_in_vehicle_day": per(t.compute_kwh, opted_vd),
                "drive_kwh_per_vehicle_day": per(t.drive_kwh, vd),
                "grid_kwh_per_vehicle_day": per(t.grid_kwh + t.fast_grid_kwh, vd),
                "fast_charges_per_vehicle_day": per(t.fast_charges, vd),
                "mean_compute_kw": t.compute_kwh * 60 / period,
            },
            "windows": {
                "compute_sessions_per_opted_in_vehicle_day": per(t.sessions, opted_vd),
                "compute_session_min_p10": _quantile(LENGTH_EDGES, t.session_hist, 0.1),
                "compute_session_min_median": _quantile(LENGTH_EDGES, t.session_hist, 0.5),
                "compute_session_min_p90": _quantile(LENGTH_EDGES, t.session_hist, 0.9),
                "parked_window_min_median": _quantile(LENGTH_EDGES, t.parked_hist, 0.5),
                "parked_window_min_p90": _quantile(LENGTH_EDGES, t.parked_hist, 0.9),
            },
            "preemption": {
                "per_vehicle_day": per(t.ended_departure, vd),
                "per_opted_in_vehicle_day": per(t.ended_departure, opted_vd),
                "share_of_sessions": per(t.ended_departure, t.sessions),
                "sessions_ended_by_hours": per(t.ended_hours, t.sessions),
                "sessions_ended_by_energy_cap": per(t.ended_cap, t.sessions),
                "sessions_ended_by_soc_floor": per(t.ended_floor, t.sessions),
            },
            "earnings": {
                "currency": "USD",
                "price_usd_per_1k_tops_hour": p.economics.price_usd_per_1k_tops_hour,
                "revenue_share": p.economics.revenue_share,
                "utilization": p.economics.utilization,
                "customer_revenue_per_day": per(t.revenue_usd, p.days),
                "owner_payout_per_opted_in_vehicle_month": per(t.payout_usd, opted * months),
                "owner_electricity_per_opted_in_vehicle_month": per(
                    t.electricity_usd, opted * months
                ),
                "owner_net_per_opted_in_vehicle_month": per(
                    t.payout_usd - t.electricity_usd, opted * months
                ),
                "owner_net_month_p10": _quantile(EARNINGS_EDGES, t.earnings_hist, 0.1),
                "owner_net_month_median": _quantile(EARNINGS_EDGES, t.earnings_hist, 0.5),
                "owner_net_month_p90": _quantile(EARNINGS_EDGES, t.earnings_hist, 0.9),
            },
        }
