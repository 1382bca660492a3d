"""``idlefleet sim``: run the vectorised fleet model and write its tables and plots.

Parameters start from the defaults of `SimParams`, or from ``--params`` (a JSON file with any
subset of its fields, such as the ``params`` object of a previous run's ``summary.json``); the
flags then override them. Each flag's type is checked as it is parsed, so a malformed value
exits 2 with argparse's message naming the flag; what only the whole parameter set can judge (a
fleet above the limit, hardware shares that do not add up to 1) raises `ParamsError`, a
ValueError that ``main`` turns into exit 2. Missing optional libraries (pyarrow, matplotlib)
and an unusable output folder are reported the same way, before the run starts. The summary
goes to stdout (a table, or JSON with ``--json``), progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlefleet.cli.argtypes import fraction, non_negative, whole

if TYPE_CHECKING:
    from idlefleet.sim.params import SimParams

__all__ = ["add_sim_parser", "run_sim"]

_ECONOMICS_FLAGS = {  # dest: EconomicsParams field
    "price": "price_usd_per_1k_tops_hour",
    "revenue_share": "revenue_share",
    "electricity_price": "electricity_usd_per_kwh",
    "utilization": "utilization",
}
_TOP_LEVEL_FLAGS = {  # dest: SimParams field
    "vehicles": "vehicles",
    "days": "days",
    "seed": "seed",
    "opt_in": "opt_in_rate",
    "chunk_vehicles": "chunk_vehicles",
}


# -- argument types (a bad value exits 2 with argparse's message) --------------------------------


def _hardware_mix(text: str) -> dict[str, float]:
    """``HW3=0.35,HW4=0.55,AI5=0.1`` → {name: share}; whether the names exist and the shares
    add up is judged later, against the parameters in use."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, share = part.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise argparse.ArgumentTypeError(
                f"expected NAME=SHARE[,NAME=SHARE...], e.g. HW3=0.35,HW4=0.55,AI5=0.1; got {text!r}"
            )
        if name in mix:
            raise argparse.ArgumentTypeError(f"{name} is given twice in {text!r}")
        try:
            mix[name] = fraction(share.strip())
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"share of {name} {exc}") from None
    return mix


def add_sim_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sim`` on the ``idlefleet`` subparsers ``sub``."""
    sim = sub.add_parser(
        "sim",
        help="simulate a fleet of parked cars (capacity, churn, earnings)",
        description="Simulate a fleet of cars day by day: when they are parked, plugged in, "
        "allowed to compute by their owners' policies, how much INT8 compute that makes over "
        "the week in UTC, and what owners earn. Writes summary.json, tables and plots.",
    )
    count = whole(1)
    fleet = sim.add_argument_group("fleet (default: the --params file, else the model defaults)")
    fleet.add_argument("--vehicles", type=count, metavar="N", help="cars (1e6 and 1_000_000 work)")
    fleet.add_argument("--days", type=count, metavar="N", help="simulated days (day 0 is Monday)")
    fleet.add_argument("--seed", type=whole(0), metavar="N", help="random seed")
    fleet.add_argument(
        "--opt-in", dest="opt_in", type=fraction, metavar="0-1", help="share of owners opted in"
    )
    fleet.add_argument(
        "--params",
        type=Path,
        metavar="FILE",
        help="JSON with any subset of the model's parameters, or a previous run's summary.json "
        "(its 'params'); flags override it",
    )
    fleet.add_argument(
        "--hardware-mix",
        type=_hardware_mix,
        metavar="NAME=SHARE,...",
        help="fleet shares of the hardware classes, e.g. HW3=0.35,HW4=0.55,AI5=0.1; classes "
        "not named get 0; the shares must add up to 1",
    )
    money = sim.add_argument_group("economics")
    money.add_argument(
        "--price", type=non_negative, metavar="USD", help="USD per 1,000 INT8 TOPS-hour"
    )
    money.add_argument(
        "--revenue-share", type=fraction, metavar="0-1", help="owner's share of the price"
    )
    money.add_argument(
        "--electricity-price", type=non_negative, metavar="USD", help="owner's USD per kWh"
    )
    money.add_argument(
        "--utilization",
        type=fraction,
        metavar="0-1",
        help="fraction of allowed compute time that is sold",
    )
    run = sim.add_argument_group("run and output")
    run.add_argument(
        "--workers", type=count, metavar="N", help="processes (default: the CPU count)"
    )
    run.add_argument(
        "--chunk-vehicles", type=count, metavar="N", help="cars simulated at once (bounds memory)"
    )
    run.add_argument(
        "--out", type=Path, default=Path("sim-out"), metavar="DIR", help="default: sim-out"
    )
    run.add_argument(
        "--format",
        dest="table_format",
        choices=("csv", "parquet"),
        default="csv",
        help="tables as CSV (default) or Parquet (needs pyarrow)",
    )
    run.add_argument("--no-plots", action="store_true", help="write no PNGs (no matplotlib)")
    run.add_argument(
        "--json", action="store_true", help="print summary.json to stdout instead of the table"
    )
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_sim(args: argparse.Namespace) -> int:
    """Simulate, write the outputs and print the summary; ValueError for what argparse cannot
    judge (``main`` turns it into exit 2)."""
    from idlefleet.sim.outputs import check_table_format, summary_document, write_outputs
    from idlefleet.sim.run import simulate

    params = _params(args)
    # Everything that could fail after a long run is checked before it.
    check_table_format(args.table_format)
    if not args.no_plots:
        from idlefleet.sim.plots import check_plotting

        check_plotting()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {args.out}: cannot create it ({exc.strerror})") from None

    result = simulate(params, workers=args.workers, progress=None if args.quiet else _progress())
    try:
        files = write_outputs(result, args.out, args.table_format)
        if not args.no_plots:
            from idlefleet.sim.plots import write_plots

            files += write_plots(result, args.out)
    except OSError as exc:
        raise ValueError(f"--out {args.out}: cannot write ({exc})") from None
    document = summary_document(result)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(_summary_text(document, files, args.out))
    return 0


def _params(args: argparse.Namespace) -> SimParams:
    """`SimParams` from the defaults or ``--params``, then the flags."""
    from idlefleet.sim.params import ParamsError, SimParams

    top = {
        field: getattr(args, dest)
        for dest, field in _TOP_LEVEL_FLAGS.items()
        if getattr(args, dest) is not None
    }
    params = _load(args.params, top) if args.params else SimParams.build(**top)
    changes: dict[str, Any] = {}
    economics = {
        field: getattr(args, dest)
        for dest, field in _ECONOMICS_FLAGS.items()
        if getattr(args, dest) is not None
    }
    if economics:
        changes["economics"] = {**params.economics.model_dump(), **economics}
    if args.hardware_mix is not None:
        known = [hardware.name for hardware in params.hardware]
        if unknown := [name for name in args.hardware_mix if name not in known]:
            raise ParamsError(
                f"--hardware-mix: unknown hardware class {', '.join(unknown)}; "
                f"known: {', '.join(known)}"
            )
        changes["hardware"] = [
            {**hardware.model_dump(), "share": args.hardware_mix.get(hardware.name, 0.0)}
            for hardware in params.hardware
        ]
    return params.replace(**changes) if changes else params


def _load(path: Path, top: dict[str, Any]) -> SimParams:
    """Parameters from ``path``: a parameters file, or a previous run's ``summary.json``, whose
    ``params`` object is used so that the run can be repeated or varied."""
    from idlefleet.sim.params import ParamsError, SimParams, load_params

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None  # load_params reads it again and words the problem
    if isinstance(data, dict) and "factors" in data and isinstance(data.get("params"), dict):
        try:
            return SimParams.build(**{**data["params"], **top})
        except ParamsError as exc:
            raise ParamsError(f"{path}: params: {exc}") from None
    return load_params(path, **top)


def _progress() -> Callable[[int, int], None]:
    # On a terminal the line is rewritten in place; in a log, one line per chunk.
    live = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        line = f"idlefleet sim: {done}/{total} chunks simulated"
        if live:
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return report


def _summary_text(summary: dict[str, Any], files: list[Path], out: Path) -> str:
    run, cal, compute = summary["run"], summary["calibration"], summary["compute"]
    factors, energy, windows = summary["factors"], summary["energy"], summary["windows"]
    preemption, money = summary["preemption"], summary["earnings"]
    rows = (
        ("parked", f"{_num(cal['parked_fraction'], '.1%')} of the time"),
        ("driving", f"{_num(cal['driving_min_per_vehicle_day'], '.1f')} min per vehicle-day"),
        (
            "mean compute, sustained",
            f"{_num(compute['mean_computing_int8_tops_sustained'], ',.0f')} INT8 TOPS "
            f"(fleet peak {_num(compute['fleet_peak_int8_tops'], ',.0f')}; INT8, not FP64)",
        ),
        (
            "factors",
            f"availability {factors['availability']:.3f} × opt-in {factors['opt_in']:.3f} × "
            f"charging {factors['charging']:.3f} × thermal {factors['thermal']:.3f} = "
            f"{factors['product']:.4f}",
        ),
        (
            "compute energy",
            f"{_num(energy['compute_kwh_per_opted_in_vehicle_day'], '.2f')} kWh per opted-in "
            "vehicle-day",
        ),
        (
            "preemptions",
            f"{_num(preemption['per_opted_in_vehicle_day'], '.2f')} per opted-in vehicle-day "
            "(driver left mid-session)",
        ),
        ("median compute session", _minutes(windows["compute_session_min_median"])),
        (
            "owner net earnings",
            f"{_usd(money['owner_net_per_opted_in_vehicle_month'])} mean, "
            f"{_usd(money['owner_net_month_median'])} median per opted-in owner-month",
        ),
        (
            "wall time",
            f"{run['wall_s']:.2f} s on {run['workers']} worker(s), "
            f"{_num(run['vehicle_days_per_s'], ',.0f')} vehicle-days/s",
        ),
    )
    width = max(len(label) for label, _ in rows)
    lines = [
        f"idlefleet sim: {run['vehicles']:,} vehicles × {run['days']} days "
        f"({run['vehicle_days']:,.0f} vehicle-days), seed {run['seed']}",
        "",
        *(f"  {label:<{width}}  {value}" for label, value in rows),
        "",
        "files:",
        *(f"  {path}" for path in files),
        "",
        f"next: idlefleet capacity --factors-from {out / 'summary.json'}",
    ]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    # A median of an empty histogram (nobody opted in) is null in the summary.
    return "n/a" if value is None else format(value, spec)


def _usd(value: float | None) -> str:
    if value is None:
        return "n/a"
    return ("-" if value < 0 else "") + f"${abs(value):,.2f}"


def _minutes(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} min ({value / 60:.1f} h)"
