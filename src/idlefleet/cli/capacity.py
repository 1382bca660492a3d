"""``idlefleet capacity``: the seed's capacity arithmetic, with every assumption a flag.

Prints ``idlefleet.sim.capacity``'s report: the seed's figures with every factor 1, then the
same figures after the availability factors. Each factor comes from its flag if given, else
from the ``factors`` object of ``--factors-from`` (what ``idlefleet sim`` writes, and what
``capacity --json`` prints), else from the fleet model, which runs only if something is still
missing. Flags are checked as they are parsed, so a bad number exits 2 with argparse's message
before any arithmetic; a bad ``--factors-from`` file raises ValueError, which ``main`` turns
into exit 2 with the file and the problem.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idlefleet.sim.capacity import (
    FACTOR_NAMES,
    AvailabilityFactors,
    CapacityAssumptions,
    capacity_report,
    fraction_problem,
    positive_problem,
)

__all__ = ["add_capacity_parser", "run_capacity"]

_DEFAULTS = CapacityAssumptions()

# dest: help. Each names the unit and the source; the default is appended from the dataclass so
# the help cannot drift from the model.
_ASSUMPTION_HELP = {
    "vehicles": "cars in the fleet (the compute seed's 10⁶; the power seed's is 1e8)",
    "tops_per_vehicle": "peak INT8 TOPS of one car's computer, nameplate (the seed's figure)",
    "kw_per_vehicle": "kW one computing car draws, cooling and power conversion included "
    "(the power seed's ~1 kW)",
    "fugaku_tflops": "Fugaku's FP64 HPL Rmax in TFLOPS (TOP500: 442 PFLOPS; the seed's 4.4e5 "
    "'TOPS')",
    "fugaku_int8_tops": "Fugaku's peak INT8 TOPS (RIKEN: 4.30 exaOPS in boost mode)",
    "el_capitan_tflops": "El Capitan's FP64 HPL Rmax in TFLOPS (TOP500, Nov 2024: 1.742 EFLOPS)",
    "el_capitan_int8_tops": "El Capitan's peak dense INT8 TOPS (44,544 AMD MI300A × 1,961.2)",
    "el_capitan_mw": "El Capitan's power in MW during HPL (TOP500, Nov 2024)",
}
_FACTOR_HELP = {
    "availability": "fraction of the time cars are parked",
    "opt_in": "fraction of parked capacity whose owners opted in",
    "charging": "fraction of opted-in parked time the owner's policy lets the car compute "
    "(charging only, charge floor, hours, energy cap)",
    "thermal": "sustained ÷ peak throughput while computing (thermal limits)",
}
_FILE_KEYS = {*FACTOR_NAMES, "source", "product"}  # product: ``capacity --json`` prints it


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,}"


def _checked(problem_of: Callable[[object], str | None]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)  # also takes 1e6 and 1_000_000
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if (problem := problem_of(value)) is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return parse


def add_capacity_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``capacity`` on the ``idlefleet`` subparsers ``sub``."""
    capacity = sub.add_parser(
        "capacity",
        help="the seed's capacity arithmetic (TOPS, Fugakus, GW), then after availability",
        description="The seed's arithmetic (5,000 TOPS × 10⁶ cars ≈ 11,363 Fugaku; 10⁸ cars × "
        "1 kW = 100 GW) with every assumption a flag, then the same figures after the "
        "availability factors.",
    )
    positive = _checked(positive_problem)
    for dest, text in _ASSUMPTION_HELP.items():
        default = getattr(_DEFAULTS, dest)
        capacity.add_argument(
            _flag(dest),
            dest=dest,
            type=positive,
            default=default,
            metavar="N",
            help=f"{text}; default {_shown(default)}",
        )
    fraction = _checked(fraction_problem)
    for dest, text in _FACTOR_HELP.items():
        capacity.add_argument(
            _flag(dest),
            dest=dest,
            type=fraction,
            default=None,
            metavar="0-1",
            help=f"{text}; default: from --factors-from, else the fleet model",
        )
    capacity.add_argument(
        "--factors-from",
        type=Path,
        metavar="PATH",
        help="JSON with a 'factors' object (as `idlefleet sim` writes); flags override it",
    )
    capacity.add_argument("--json", action="store_true", help="print the report as JSON")


def run_capacity(args: argparse.Namespace) -> int:
    """Print the report; ValueError (exit 2 in ``main``) for a bad factors file."""
    assumptions = CapacityAssumptions(**{dest: getattr(args, dest) for dest in _ASSUMPTION_HELP})
    report = capacity_report(assumptions, _factors(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0


def _factors(args: argparse.Namespace) -> AvailabilityFactors:
    """Each factor from its flag, else the file, else the fleet model; the source says which."""
    chosen = {name: getattr(args, name) for name in FACTOR_NAMES if getattr(args, name) is not None}
    sources = [_whence("flags", list(chosen))] if chosen else []
    if args.factors_from is not None:  # read even if every flag is given: a bad file is an error
        from_file, file_source = _read_factors(args.factors_from)
        if taken := [name for name in FACTOR_NAMES if name not in chosen and name in from_file]:
            chosen.update({name: from_file[name] for name in taken})
            sources.append(_whence(file_source, taken))
    if missing := [name for name in FACTOR_NAMES if name not in chosen]:
        model = _fleet_model()
        chosen.update({name: getattr(model, name) for name in missing})
        sources.append(_whence(model.source, missing))
    return AvailabilityFactors(**chosen, source="; ".join(sources))


def _whence(source: str, names: list[str]) -> str:
    return source if len(names) == len(FACTOR_NAMES) else f"{', '.join(names)}: {source}"


def _read_factors(path: Path) -> tuple[dict[str, float], str]:
    """The factors in ``path`` (any subset of the four) and where they came from."""
    where = f"--factors-from {path}"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    factors: Any = loaded.get("factors") if isinstance(loaded, dict) else None
    if not isinstance(factors, dict):
        raise ValueError(f"{where}: no 'factors' object (expected the JSON `idlefleet sim` writes)")
    # Unknown keys are refused rather than skipped: a misspelt factor ("opt-in") would
    # otherwise be replaced, silently, by the fleet model's value.
    if unknown := sorted(set(factors) - _FILE_KEYS):
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} in 'factors'; "
            f"expected {', '.join(FACTOR_NAMES)} and optionally source"
        )
    for name in FACTOR_NAMES:
        if name in factors and (problem := fraction_problem(factors[name])) is not None:
            raise ValueError(f"{where}: factors.{name} {problem}, got {factors[name]!r}")
    source = factors.get("source")
    described = f"{source} (from {path})" if isinstance(source, str) and source else str(path)
    return {name: float(factors[name]) for name in FACTOR_NAMES if name in factors}, described


def _fleet_model() -> AvailabilityFactors:
    # Imported only here: the model is the slow part, and is skipped when every factor is given.
    try:
        from idlefleet.sim.factors import fleet_model_factors
    except ModuleNotFoundError as exc:
        if exc.name != "idlefleet.sim.factors":
            raise
        raise ValueError(
            "the fleet model (idlefleet.sim.factors) is not available; give every factor "
            "(--availability, --opt-in, --charging, --thermal) or --factors-from"
        ) from None
    factors: AvailabilityFactors = fleet_model_factors()
    return factors
