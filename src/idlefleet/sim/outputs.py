"""Write a fleet run to disk: its summary as JSON and its tables as CSV or Parquet.

``summary.json`` holds every headline figure (`SimResult.summary`) and the full parameters, so
``idlefleet sim --params summary.json`` reruns the same fleet and ``idlefleet capacity
--factors-from summary.json`` reads its ``factors``. Three tables sit beside it: the time series
in UTC (``timeseries``), the histogram of compute-session and parked-window lengths
(``windows``) and that of opted-in owners' monthly net earnings (``earnings``; an owner below
the first bin or above the last is counted in that end bin). CSV is written with the standard
library and needs nothing else; Parquet needs pyarrow (the ``sim`` extra). Every column name
carries its unit.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idlefleet.sim.run import SimResult
from idlefleet.sim.tally import EARNINGS_EDGES, LENGTH_EDGES, SERIES

__all__ = [
    "TABLE_FORMATS",
    "WEEKDAYS",
    "check_table_format",
    "summary_document",
    "write_outputs",
]

TABLE_FORMATS = ("csv", "parquet")
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
PARQUET_HINT = "Parquet output needs pyarrow: pip install 'idlefleet[sim]'"

# The series names already end in their unit (vehicles, int8_tops_peak / _sustained, kw), so
# they are the column names as they are; a new series must follow suit.
_SIG_DIGITS = 6

Table = dict[str, Sequence[Any] | np.ndarray]


def check_table_format(table_format: str) -> None:
    """Raise ValueError unless ``table_format`` can be written here (checked before a run)."""
    if table_format not in TABLE_FORMATS:
        raise ValueError(
            f"unknown table format {table_format!r}; choose from {', '.join(TABLE_FORMATS)}"
        )
    if table_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(PARQUET_HINT) from None


def summary_document(result: SimResult) -> dict[str, Any]:
    """`SimResult.summary` plus the parameters, with NaN (an empty histogram's median) as null
    so the file is strict JSON. The factors say where they came from, which ``idlefleet
    capacity --factors-from`` quotes in its report."""
    summary, p = result.summary(), result.params
    summary["factors"]["source"] = (
        f"fleet model: {p.vehicles:,} vehicles × {p.days} days, seed {p.seed} (idlefleet sim)"
    )
    return _finite({**summary, "params": p.model_dump(mode="json")})


def write_outputs(result: SimResult, out_dir: Path, table_format: str = "csv") -> list[Path]:
    """Write ``summary.json`` and the ``timeseries``, ``windows`` and ``earnings`` tables
    (``table_format``: csv or parquet) into ``out_dir``; return the paths written."""
    check_table_format(table_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "summary.json"
    summary.write_text(json.dumps(summary_document(result), indent=2) + "\n", encoding="utf-8")
    written = [summary]
    tables = {
        "timeseries": _timeseries_table(result),
        "windows": _windows_table(result),
        "earnings": _earnings_table(result),
    }
    for name, table in tables.items():
        path = out_dir / f"{name}.{table_format}"
        if table_format == "csv":
            _write_csv(path, table, rounded=name == "timeseries")
        else:
            _write_parquet(path, table)
        written.append(path)
    return written


def _timeseries_table(result: SimResult) -> Table:
    series = result.timeseries()
    minute = series["minute"].astype(np.int64)
    day = minute // 1440
    weekday = [WEEKDAYS[(result.params.start_weekday + int(d)) % 7] for d in day]
    hhmm = [f"{m // 60:02d}:{m % 60:02d}" for m in (minute % 1440).tolist()]
    table: Table = {"utc_minute": minute, "weekday_utc": weekday, "time_utc": hhmm}
    table.update({name: series[name] for name in SERIES})
    return table


def _windows_table(result: SimResult) -> Table:
    tally = result.tally
    return {
        "min_from": LENGTH_EDGES[:-1],
        "min_to": LENGTH_EDGES[1:],
        "compute_sessions": _counts(tally.session_hist),
        "parked_windows": _counts(tally.parked_hist),
    }


def _earnings_table(result: SimResult) -> Table:
    return {
        "usd_from": EARNINGS_EDGES[:-1],
        "usd_to": EARNINGS_EDGES[1:],
        "opted_in_owners": _counts(result.tally.earnings_hist),
    }


def _counts(hist: np.ndarray) -> np.ndarray:
    # The tally keeps counts as floats so chunks merge by plain addition; whole counts are
    # written as integers, but a weighted (fractional) count would be kept, not rounded away.
    return hist.astype(np.int64) if np.all(hist == np.round(hist)) else hist


def _write_csv(path: Path, table: Table, *, rounded: bool) -> None:
    columns = list(table)
    cells = [[_cell(value, rounded) for value in _values(table[name])] for name in columns]
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(zip(*cells, strict=True))


def _values(column: Sequence[Any] | np.ndarray) -> list[Any]:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


def _cell(value: Any, rounded: bool) -> Any:
    if isinstance(value, float):
        # Averages over a bin carry no more than a few digits of meaning; six significant
        # digits keep the file small and readable. Bin edges are kept exact (repr).
        return repr(float(f"{value:.{_SIG_DIGITS}g}")) if rounded else repr(value)
    return value


def _write_parquet(path: Path, table: Table) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(PARQUET_HINT) from None
    pq.write_table(pa.table({name: _values(column) for name, column in table.items()}), path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
