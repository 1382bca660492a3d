"""The fleet model's figures that the traffic plan reads: per-car shares, rates and peaks.

`idlefleet.sim.rates` turns these into messages, bytes and servers. They come from a parsed
``summary.json`` (and the columns of its time series) and nothing else, so this module is the
one place that knows which summary fields mean what, and checks them: a missing field, a
negative or non-finite number, region shares that do not add up, or a time series from another
run raises `RatesInputError` with the field's dotted path. No I/O: callers read the files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FleetFigures",
    "Peaks",
    "RatesInputError",
    "figures_from_summary",
    "peaks_from_timeseries",
    "regional_figures",
]

MEAN_TOLERANCE = 0.01
"""How far a time series' mean of computing cars may be from its summary's (relative): the CSV
keeps six significant digits, so a larger gap means the two files are from different runs."""


class RatesInputError(ValueError):
    """A summary or time series the rates cannot be computed from; the message names the field."""


@dataclass(frozen=True)
class FleetFigures:
    """Per-car figures of one model run, the only things taken from ``summary.json``."""

    model_vehicles: int
    """Cars in the run (what ``--vehicles`` scales from)."""
    regions: tuple[tuple[str, float], ...]
    """(name, share of the fleet) per region, from ``params.regions``."""
    opted_in_share: float
    computing_share: float
    """Mean computing cars ÷ cars."""
    driving_share: float
    """Mean driving cars ÷ cars (1 − parked fraction)."""
    trips_per_vehicle_day: float
    sessions_per_opted_in_vehicle_day: float
    utilization: float
    source: str
    opted_in_source: str
    """Which summary figures the opted-in share came from (the summary has no count of it)."""


@dataclass(frozen=True)
class Peaks:
    """Peak ÷ mean of the model's diurnal series, by which rates at the mean scale to the peak."""

    computing: float = 1.0
    driving: float = 1.0
    source: str = "none (rates at the mean)"


# -- summary ----------------------------------------------------------------------------------


def _get(summary: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path``; a number steps into a list (``params.regions.0.share``)."""
    value: Any = summary
    for key in path.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, Mapping) and key in value:
            value = value[key]
        else:
            raise RatesInputError(f"{path}: missing")
    return value


def _number(summary: Mapping[str, Any], path: str, upper: float = math.inf) -> float:
    value = _get(summary, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RatesInputError(f"{path}: must be a finite number, got {value!r}")
    if not 0 <= value <= upper:
        bound = ">= 0" if upper == math.inf else f"between 0 and {upper:g}"
        raise RatesInputError(f"{path}: must be {bound}, got {value!r}")
    return float(value)


def _regions(summary: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    regions = _get(summary, "params.regions")
    if not isinstance(regions, list) or not regions:
        raise RatesInputError("params.regions: must be a non-empty list")
    out = []
    for i, region in enumerate(regions):
        name = region.get("name") if isinstance(region, Mapping) else None
        if not isinstance(name, str) or not name:
            raise RatesInputError(f"params.regions.{i}.name: must be a non-empty string")
        out.append((name, _number(summary, f"params.regions.{i}.share", 1.0)))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise RatesInputError(f"params.regions: names must be unique, got {names}")
    total = math.fsum(share for _, share in out)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise RatesInputError(f"params.regions: shares must add up to 1, got {total:g}")
    return tuple(out)


def _opted_in_share(summary: Mapping[str, Any]) -> tuple[float, str]:
    # The summary gives per-vehicle-day and per-opted-in-vehicle-day versions of the same
    # totals, so their ratio is the opted-in share the run drew (not the rate it drew it at).
    for per_vehicle, per_opted in (
        ("preemption.per_vehicle_day", "preemption.per_opted_in_vehicle_day"),
        ("energy.compute_kwh_per_vehicle_day", "energy.compute_kwh_per_opted_in_vehicle_day"),
    ):
        denominator = _number(summary, per_opted)
        if denominator > 0:
            share = _number(summary, per_vehicle) / denominator
            if share > 1 + 1e-9:
                raise RatesInputError(f"{per_vehicle}: larger than {per_opted}")
            return min(share, 1.0), f"{per_vehicle} ÷ {per_opted}"
    return _number(summary, "params.opt_in_rate", 1.0), "params.opt_in_rate (nothing computed)"


def figures_from_summary(summary: Mapping[str, Any]) -> FleetFigures:
    """The per-car figures of a parsed ``summary.json``; `RatesInputError` names a missing or
    bad field."""
    if not isinstance(summary, Mapping):
        raise RatesInputError("expected a JSON object (the summary.json `idlefleet sim` writes)")
    vehicles = _number(summary, "run.vehicles")
    if vehicles < 1 or not vehicles.is_integer():
        raise RatesInputError(f"run.vehicles: must be a whole number >= 1, got {vehicles!r}")
    opted, opted_source = _opted_in_share(summary)
    computing = _number(summary, "compute.mean_computing_vehicles")
    if computing > vehicles * (1 + 1e-9):
        raise RatesInputError("compute.mean_computing_vehicles: more than run.vehicles")
    days = _number(summary, "run.days")
    regions = _regions(summary)
    factors = summary.get("factors")
    source = factors.get("source") if isinstance(factors, Mapping) else None
    if not isinstance(source, str) or not source:
        source = f"fleet model: {vehicles:,.0f} vehicles × {days:g} days"
    if len(regions) == 1:
        source += f", region {regions[0][0]} alone"
    return FleetFigures(
        model_vehicles=int(vehicles),
        regions=regions,
        opted_in_share=opted,
        computing_share=min(computing / vehicles, 1.0),
        driving_share=1.0 - _number(summary, "calibration.parked_fraction", 1.0),
        trips_per_vehicle_day=_number(summary, "calibration.trips_per_vehicle_day"),
        sessions_per_opted_in_vehicle_day=_number(
            summary, "windows.compute_sessions_per_opted_in_vehicle_day"
        ),
        utilization=_number(summary, "earnings.utilization", 1.0),
        source=source,
        opted_in_source=opted_source,
    )


_SAME_MODEL_EXCEPT = {"vehicles", "seed", "chunk_vehicles", "regions"}


def regional_figures(
    fleet_summary: Mapping[str, Any], region_summary: Mapping[str, Any], name: str
) -> FleetFigures:
    """Figures of region ``name`` from its own single-region run, after checking that the run
    models that region exactly as the fleet run does (everything but the fleet size, seed and
    the other regions); a mismatch raises `RatesInputError` naming the fields."""
    figures_from_summary(fleet_summary)  # the fleet's summary is checked as well
    figures = figures_from_summary(region_summary)
    if [region for region, _ in figures.regions] != [name]:
        raise RatesInputError(
            f"the run for {name} must model that one region, got "
            f"{[region for region, _ in figures.regions]}"
        )
    fleet_regions = {r["name"]: r for r in _get(fleet_summary, "params.regions")}
    if name not in fleet_regions:
        raise RatesInputError(f"{name}: not a region of the fleet run ({', '.join(fleet_regions)})")
    ours = {k: v for k, v in fleet_regions[name].items() if k != "share"}
    theirs = {k: v for k, v in _get(region_summary, "params.regions")[0].items() if k != "share"}
    fleet_params, region_params = _get(fleet_summary, "params"), _get(region_summary, "params")
    differ = [
        key
        for key in sorted(set(fleet_params) | set(region_params))
        if key not in _SAME_MODEL_EXCEPT and fleet_params.get(key) != region_params.get(key)
    ]
    if ours != theirs:
        differ.insert(0, f"regions[{name}]")
    if differ:
        raise RatesInputError(
            f"the run for {name} models the fleet differently: params {', '.join(differ)} differ"
        )
    return figures


def _column(table: Mapping[str, Sequence[float]], name: str) -> list[float]:
    if name not in table:
        raise RatesInputError(f"timeseries: no column {name!r}")
    try:
        values = [float(v) for v in table[name]]
    except (TypeError, ValueError):
        raise RatesInputError(
            f"timeseries: column {name!r} holds a value that is not a number"
        ) from None
    if not values:
        raise RatesInputError(f"timeseries: column {name!r} is empty")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise RatesInputError(f"timeseries: column {name!r} must hold finite numbers >= 0")
    return values


def _peak_to_mean(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def peaks_from_timeseries(table: Mapping[str, Sequence[float]], figures: FleetFigures) -> Peaks:
    """Peak ÷ mean of computing cars and of driving cars (cars − parked) over the binned series
    of the run ``figures`` came from; a series whose mean does not match is refused."""
    computing = _column(table, "computing_vehicles")
    parked = _column(table, "parked_vehicles")
    if len(parked) != len(computing):
        raise RatesInputError("timeseries: columns of different lengths")
    cars = figures.model_vehicles
    expected = figures.computing_share * cars
    mean = math.fsum(computing) / len(computing)
    if abs(mean - expected) > MEAN_TOLERANCE * max(expected, 1.0):
        raise RatesInputError(
            f"timeseries: mean computing_vehicles {mean:,.1f} is not the summary's "
            f"{expected:,.1f}: the files are from different runs"
        )
    driving = [max(cars - p, 0.0) for p in parked]
    expected = figures.driving_share * cars
    mean = math.fsum(driving) / len(driving)
    if abs(mean - expected) > MEAN_TOLERANCE * max(expected, 1.0):
        raise RatesInputError(
            f"timeseries: mean driving vehicles {mean:,.1f} (cars − parked_vehicles) is not the "
            f"summary's {expected:,.1f}: the files are from different runs"
        )
    return Peaks(
        computing=_peak_to_mean(computing),
        driving=_peak_to_mean(driving),
        source=f"time series of {figures.source}, {len(computing)} bins",
    )
