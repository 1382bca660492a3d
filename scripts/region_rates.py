"""Messages, bytes and servers per region for a fleet, from a fleet-model run.

    idlefleet sim --vehicles 1000000 --days 7 --seed 0 --out /tmp/sim-out
    .venv/bin/python scripts/region_rates.py --sim-out /tmp/sim-out --vehicles 1e8

Reads the run's ``summary.json`` and, if present, its ``timeseries.csv`` (or ``.parquet``) for
the peaks, scales the run to ``--vehicles`` cars and prints, per region and in total, the rates
the cloud must carry at the peak and the NATS nodes, coordinator replicas and PostgreSQL
primaries they need, with the limit that binds first. Every assumption of
`idlefleet.sim.rates` is a flag, generated from its fields so the help cannot drift from the
model. A region can be given its own single-region run (``--region-sim-out NAME=DIR``) for its
per-car figures and its own peaks: the fleet's time series mixes every time zone, so its
peak ÷ mean is lower than any one region's. Bad input exits 2 with a message naming it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from idlefleet.cli.argtypes import number, whole
from idlefleet.sim.rates import (
    FleetFigures,
    FleetPlan,
    Peaks,
    RatesInputError,
    RegionPlan,
    ScaleLimits,
    TrafficAssumptions,
    figures_from_summary,
    peaks_from_timeseries,
    plan_fleet,
    regional_figures,
)

_MODELS: tuple[type[BaseModel], ...] = (TrafficAssumptions, ScaleLimits)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least_one(text: str) -> float:
    value = number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (a peak ÷ mean), got {text}")
    return value


def _region_dir(text: str) -> tuple[str, Path]:
    name, sep, where = text.partition("=")
    if not sep or not name.strip() or not where.strip():
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIR, e.g. us-west=/tmp/us-west; got {text!r}"
        )
    return name.strip(), Path(where.strip())


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    group = parser.add_argument_group(
        f"{model.__name__} (idlefleet.sim.rates)", (model.__doc__ or "").strip()
    )
    for name, info in model.model_fields.items():
        choices = None
        parse: Callable[[str], Any] = number
        args = typing.get_args(info.annotation)
        if typing.get_origin(info.annotation) is typing.Literal:
            choices, parse = args, str
        text = " ".join((info.description or "").split())
        group.add_argument(
            _flag(name),
            dest=name,
            type=parse,
            choices=choices,
            default=None,
            metavar="X" if choices is None else None,
            help=f"{text} Default: {info.default}.".replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="region_rates.py",
        description="Per-region message rates, bytes and servers for a fleet, from the output of "
        "`idlefleet sim`.",
    )
    parser.add_argument(
        "--sim-out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of an `idlefleet sim` run: summary.json, and timeseries.csv if present",
    )
    parser.add_argument(
        "--vehicles",
        type=whole(1),
        metavar="N",
        help="cars to plan for (1e8 works); default: the run's fleet",
    )
    parser.add_argument(
        "--region-sim-out",
        type=_region_dir,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a single-region run of the same model for region NAME: its per-car figures and "
        "peaks replace the fleet's for that region (repeatable)",
    )
    parser.add_argument(
        "--no-timeseries", action="store_true", help="ignore time series: rates at the mean"
    )
    for which in ("computing", "driving"):
        parser.add_argument(
            f"--{which}-peak-to-mean",
            type=_at_least_one,
            metavar="R",
            help=f"peak ÷ mean of {which} cars for every region without its own run "
            "(default: from the time series, else 1)",
        )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    for model in _MODELS:
        _add_model_flags(parser, model)
    return parser


def _model(
    parser: argparse.ArgumentParser, model: type[BaseModel], args: argparse.Namespace
) -> Any:
    given = {
        name: getattr(args, name) for name in model.model_fields if getattr(args, name) is not None
    }
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        problems = [
            f"{_flag(str(error['loc'][0]))}: {error['msg']} (got {error['input']!r})"
            for error in exc.errors()
        ]
        parser.error("; ".join(problems))


# -- reading a run ----------------------------------------------------------------------------


def _summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RatesInputError(f"{path}: not found (run `idlefleet sim --out {folder}`)") from None
    except OSError as exc:
        raise RatesInputError(f"{path}: cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RatesInputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RatesInputError(f"{path}: expected a JSON object")
    return data


def _timeseries(folder: Path) -> tuple[dict[str, list[str]], Path] | None:
    """The columns of the run's time series (CSV, else Parquet), or None if it has none."""
    path = folder / "timeseries.csv"
    if path.is_file():
        try:
            with path.open(newline="", encoding="utf-8") as file:
                rows = list(csv.reader(file))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise RatesInputError(f"{path}: cannot read it ({exc})") from None
        if not rows or any(len(row) != len(rows[0]) for row in rows):
            raise RatesInputError(f"{path}: not a table (empty, or rows of different lengths)")
        return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}, path
    path = folder / "timeseries.parquet"
    if path.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RatesInputError(f"{path}: reading Parquet needs pyarrow") from None
        return {k: list(map(str, v)) for k, v in pq.read_table(path).to_pydict().items()}, path
    return None


def _where(path: Path, read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)``, with ``path`` put before the problem if it raises `RatesInputError`."""
    try:
        return read(*args)
    except RatesInputError as exc:
        raise RatesInputError(f"{path}: {exc}") from None


def _inputs(
    args: argparse.Namespace,
) -> tuple[FleetFigures, Peaks | None, dict[str, tuple[FleetFigures, Peaks]]]:
    summary = _summary(args.sim_out)
    figures = _where(args.sim_out / "summary.json", figures_from_summary, summary)
    peaks = None if args.no_timeseries else _peaks(args.sim_out, figures)
    if args.computing_peak_to_mean is not None or args.driving_peak_to_mean is not None:
        base = peaks or Peaks()
        peaks = Peaks(
            computing=args.computing_peak_to_mean or base.computing,
            driving=args.driving_peak_to_mean or base.driving,
            source=f"flags; {base.source}",
        )
    regional = {}
    for name, folder in args.region_sim_out:
        if name in regional:
            raise RatesInputError(f"--region-sim-out: {name} is given twice")
        theirs = _summary(folder)
        fig = _where(folder / "summary.json", regional_figures, summary, theirs, name)
        # A region run without a time series takes the fleet's peaks.
        own = None if args.no_timeseries else _peaks(folder, fig)
        regional[name] = (fig, own or peaks or Peaks())
    return figures, peaks, regional


def _peaks(folder: Path, figures: FleetFigures) -> Peaks | None:
    found = _timeseries(folder)
    if found is None:
        return None
    table, path = found
    peaks: Peaks = _where(path, peaks_from_timeseries, table, figures)
    return peaks


# -- the report --------------------------------------------------------------------------------


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


_ROWS: tuple[tuple[str, Callable[[RegionPlan], str]], ...] = (
    ("cars", lambda p: _si(p.peak.cars)),
    ("NATS connections", lambda p: _si(p.peak.connected_cars)),
    ("computing cars, mean", lambda p: _si(p.mean.computing_cars)),
    ("computing cars, peak", lambda p: _si(p.peak.computing_cars)),
    ("heartbeats/s", lambda p: _si(p.peak.heartbeats_per_s)),
    ("registrations/s", lambda p: _si(p.peak.registrations_per_s)),
    ("leases/s", lambda p: _si(p.peak.leases_per_s)),
    ("result chunks/s", lambda p: _si(p.peak.result_chunks_per_s)),
    ("result bytes/s", lambda p: _si(p.peak.result_bytes_per_s, "B")),
    ("releases/s", lambda p: _si(p.peak.releases_per_s)),
    ("policy pushes/s", lambda p: _si(p.peak.policy_pushes_per_s)),
    ("NATS messages/s", lambda p: _si(p.peak.nats_messages_per_s)),
    ("NATS bytes/s", lambda p: _si(p.peak.nats_bytes_per_s, "B")),
    ("coordinator work ops/s", lambda p: _si(p.peak.coordinator_work_ops_per_s)),
    ("durable transactions/s", lambda p: _si(p.peak.durable_transactions_per_s)),
    ("durable bytes/s", lambda p: _si(p.peak.durable_bytes_per_s, "B")),
    ("NATS nodes", lambda p: f"{p.nats.servers:,}"),
    ("  bound by", lambda p: p.nats.binding),
    ("coordinator replicas", lambda p: f"{p.coordinators.servers:,}"),
    ("  bound by", lambda p: p.coordinators.binding),
    ("PostgreSQL primaries", lambda p: f"{p.postgres.servers:,}"),
    ("  bound by", lambda p: p.postgres.binding),
)


def format_plan(plan: FleetPlan) -> str:
    """The plan as a table: one column per region and the total, rates at the peak."""
    columns = [*plan.regions, plan.total]
    width = max(12, *(len(c.name) + 1 for c in columns))
    lines = [
        f"{plan.vehicles:,.0f} cars; per-car figures: {plan.figures.source}",
        "rates at the peak (compute-driven × peak÷mean of computing cars, trip-driven × that "
        "of driving cars):",
        "",
        f"{'':24}" + "".join(f"{c.name:>{width}}" for c in columns),
    ]
    for label, cell in _ROWS:
        lines.append(f"{label:24}" + "".join(f"{cell(c):>{width}}" for c in columns))
    lines += ["", "peak ÷ mean of computing and of driving cars; what fails first (largest load):"]
    for region in plan.regions:
        lines.append(
            f"  {region.name:12} {region.peaks.computing:.3f} {region.peaks.driving:.3f}  "
            f"{region.first_to_fail}"
        )
    lines.append(f"  {'total':12} {'':11}  {plan.total.first_to_fail}")
    by_source: dict[str, list[str]] = {}
    for region in plan.regions:
        by_source.setdefault(region.peaks.source, []).append(region.name)
    for source, names in by_source.items():
        lines.append(f"peaks of {', '.join(names)}: {source}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    traffic = _model(parser, TrafficAssumptions, args)
    limits = _model(parser, ScaleLimits, args)
    try:
        figures, peaks, regional = _inputs(args)
        plan = plan_fleet(
            figures, traffic, limits, vehicles=args.vehicles, peaks=peaks, regional=regional
        )
    except RatesInputError as exc:
        print(f"region_rates.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"region_rates.py: error: --json {args.json}: {exc.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
