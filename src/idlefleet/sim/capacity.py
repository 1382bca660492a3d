"""The capacity arithmetic behind the mission's seeds, with every assumption a parameter.

The seeds multiply nameplate figures: 5,000 peak INT8 TOPS × 10⁶ cars = 5×10⁹ TOPS ≈ 11,363
Fugaku (4.4×10⁵ "TOPS" each), and 10⁸ cars × ~1 kW = 100 GW with cooling and power conversion
already paid for. ``capacity_report`` reproduces those figures exactly when every availability
factor is 1, then shows the same quantities after the fleet model's factors (time parked, owners
opted in, owner policy and charging, thermal limits), and labels each figure honestly: peak or
sustained, INT8 or FP64. This module is pure float arithmetic, no I/O and no rounding; only
``CapacityReport.format_text`` rounds, for people to read.
"""

from __future__ import annotations

import math
import operator
import textwrap
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

__all__ = [
    "FACTOR_NAMES",
    "OMITTED",
    "AvailabilityFactors",
    "CapacityAssumptions",
    "CapacityReport",
    "CapacityRow",
    "capacity_report",
    "fraction_problem",
    "positive_problem",
]

FACTOR_NAMES = ("availability", "opt_in", "charging", "thermal")

OMITTED = (
    "Units: TOP500 ranks FP64 HPL Rmax; a car's accelerator quotes peak INT8 (often FP4 or "
    "sparse) and does little or no FP64, so 'Fugaku equivalents' in the seed's units compare "
    "different things.",
    "Peak vs sustained: nameplate TOPS assume every unit busy every cycle; real models reach a "
    "fraction of it, less when memory-bound.",
    "One machine vs many: a supercomputer has a low-latency fabric; cars talk over home Wi-Fi "
    "or cellular at tens of ms, so only embarrassingly parallel work (batch inference) fits — "
    "not HPL, not training.",
    "Memory: each car holds one model within its own memory; nothing is pooled.",
    "Trust: results from untrusted nodes need checking; plain replication costs ≥ 50 %, "
    "adaptive replication 5–10 % (BOINC), and nodes vanish (keep 5–10 % spare, Salad).",
    "Energy: the car's cooling and power conversion are already paid for; the electricity and "
    "the battery's wear are not.",
)


def positive_problem(value: object) -> str | None:
    """Why ``value`` is not a finite number > 0, or None if it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a positive number"
    if not (math.isfinite(value) and value > 0):
        return "must be a positive, finite number"
    return None


def fraction_problem(value: object) -> str | None:
    """Why ``value`` is not a number in [0, 1], or None if it is (NaN fails both bounds)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return "must be between 0 and 1"
    return None


@dataclass(frozen=True)
class CapacityAssumptions:
    """The nameplate figures the seeds multiply; every one must be a finite number > 0."""

    vehicles: float = 1_000_000
    """Cars in the fleet: 10⁶ in the compute seed, 10⁸ in the power seed."""
    tops_per_vehicle: float = 5_000.0
    """Peak INT8 TOPS of one car's computer, nameplate (the seed's figure)."""
    kw_per_vehicle: float = 1.0
    """Electric power of one computing car incl. cooling and power conversion (the seed's ~1 kW)."""
    fugaku_tflops: float = 4.4e5
    """Fugaku's HPL Rmax, 442 PFLOPS FP64 (TOP500), ≈ 4.4×10⁵ TFLOPS; the seed calls it TOPS."""
    fugaku_int8_tops: float = 4.30e6
    """Fugaku's peak INT8, 4.30 exaOPS in boost mode (RIKEN's system specification)."""
    el_capitan_tflops: float = 1.742e6
    """El Capitan's HPL Rmax, 1.742 EFLOPS FP64 (TOP500, November 2024)."""
    el_capitan_int8_tops: float = 44_544 * 1_961.2
    """El Capitan's peak INT8: 44,544 AMD MI300A × 1,961.2 dense INT8 TOPS each (AMD's spec)."""
    el_capitan_mw: float = 29.6
    """El Capitan's power during HPL in MW (TOP500, November 2024)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if (problem := positive_problem(value)) is not None:
                raise ValueError(f"{name} {problem}, got {value!r}")


@dataclass(frozen=True)
class AvailabilityFactors:
    """The fractions of nameplate capacity that survive, each in [0, 1], applied in order."""

    availability: float
    """Fraction of the time cars are parked."""
    opt_in: float
    """Fraction of parked capacity whose owners opted in."""
    charging: float
    """Fraction of opted-in parked time the owner's policy lets the car compute (charging only,
    state-of-charge floor, allowed hours, daily energy cap)."""
    thermal: float
    """Sustained ÷ peak throughput while computing (thermal limits)."""
    source: str = "flags"
    """Where the factors came from, e.g. ``fleet model: 20,000 vehicles × 7 days, seed 0``."""

    def __post_init__(self) -> None:
        for name in FACTOR_NAMES:
            value = getattr(self, name)
            if (problem := fraction_problem(value)) is not None:
                raise ValueError(f"{name} {problem}, got {value!r}")

    @classmethod
    def ones(cls) -> AvailabilityFactors:
        """The seed's implicit assumption: every car, all the time, at peak."""
        return cls(1.0, 1.0, 1.0, 1.0, source="every factor = 1 (the seed's assumption)")

    @property
    def product(self) -> float:
        """All four factors multiplied, in order; the fraction of nameplate that is left."""
        return self.cumulative()[-1]

    def cumulative(self) -> tuple[float, ...]:
        """The running product after each factor, in the order of ``FACTOR_NAMES``."""
        return tuple(accumulate((getattr(self, name) for name in FACTOR_NAMES), operator.mul))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "product": self.product}


@dataclass(frozen=True)
class CapacityRow:
    """One figure of the report; ``key`` names it for machines, ``label`` for people."""

    label: str
    value: float
    unit: str
    note: str
    key: str


@dataclass(frozen=True)
class CapacityReport:
    """The seed's figures (every factor 1) and the same figures after ``factors``."""

    seed: tuple[CapacityRow, ...]
    after: tuple[CapacityRow, ...]
    factors: AvailabilityFactors
    assumptions: CapacityAssumptions

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; its ``factors`` object is also what ``--factors-from`` reads back."""
        return {
            "assumptions": asdict(self.assumptions),
            "factors": self.factors.to_dict(),
            "seed": [asdict(row) for row in self.seed],
            "after": [asdict(row) for row in self.after],
            "omitted": list(OMITTED),
        }

    def format_text(self) -> str:
        """A plain-text table: assumptions, the seed's figures, the figures after the factors."""
        a, f = self.assumptions, self.factors
        steps, scaled = self.after[: len(FACTOR_NAMES)], self.after[len(FACTOR_NAMES) :]
        return "\n".join(
            [
                "Assumptions",
                f"  vehicles     {_number(a.vehicles)}",
                f"  per vehicle  {_number(a.tops_per_vehicle)} peak INT8 TOPS, "
                f"{_number(a.kw_per_vehicle)} kW incl. cooling and power conversion",
                f"  Fugaku       {_number(a.fugaku_tflops)} TFLOPS FP64 HPL Rmax, "
                f"{_number(a.fugaku_int8_tops)} peak INT8 TOPS",
                f"  El Capitan   {_number(a.el_capitan_tflops)} TFLOPS FP64 HPL Rmax, "
                f"{_number(a.el_capitan_int8_tops)} peak INT8 TOPS, {_number(a.el_capitan_mw)} MW",
                "",
                "Seed arithmetic (every factor = 1; peak INT8 TOPS, nameplate)",
                *_row_lines(self.seed, notes=True),
                "",
                "After the fleet model's factors (sustained INT8 TOPS)",
                f"  factors: {f.source}",
                "  "
                + " × ".join(f"{name} {_number(getattr(f, name))}" for name in FACTOR_NAMES)
                + f" = {_number(f.product)} of nameplate",
                f"  {_number(self.seed[0].value):>10} {self.seed[0].unit:<10}  nameplate",
                *_row_lines(steps, notes=True, shares=f.cumulative()),
                "  the seed's figures × every factor:",
                *_row_lines(scaled, notes=False),
                "",
                "What the seed leaves out",
                *(
                    textwrap.fill(item, width=100, initial_indent="  - ", subsequent_indent="    ")
                    for item in OMITTED
                ),
            ]
        )


_SEED_UNITS = "(seed's units: INT8 TOPS ÷ FP64 TFLOPS — not the same unit)"
_ROWS: tuple[tuple[str, str, str | None, str, str], ...] = (
    # key, label in the seed section, label after the factors (None: the same), unit, note
    ("fleet_int8_tops", "fleet peak compute", "average sustained available compute",
     "INT8 TOPS", "vehicles × peak INT8 TOPS per vehicle (nameplate)"),
    ("fugaku_seed_units", f"Fugaku equivalents {_SEED_UNITS}", None,
     "Fugaku", "fleet peak INT8 TOPS ÷ Fugaku's FP64 HPL Rmax in TFLOPS, as the seed divides"),
    ("fugaku_int8", "Fugaku equivalents, like for like (INT8 ÷ Fugaku's peak INT8)", None,
     "Fugaku", "fleet peak INT8 TOPS ÷ Fugaku's peak INT8 TOPS"),
    ("el_capitan_seed_units", f"El Capitan equivalents {_SEED_UNITS}", None,
     "El Capitan", "fleet peak INT8 TOPS ÷ El Capitan's FP64 HPL Rmax in TFLOPS"),
    ("el_capitan_int8", "El Capitan equivalents, like for like (INT8 ÷ El Capitan's peak INT8)",
     None, "El Capitan", "fleet peak INT8 TOPS ÷ El Capitan's peak dense INT8 TOPS"),
    ("fleet_gw", "fleet electric power, every car computing", "average computing power",
     "GW", "vehicles × kW per vehicle; cooling and power conversion included"),
    ("el_capitan_power", "fleet power in El Capitans", "average computing power in El Capitans",
     "El Capitan", "fleet MW ÷ El Capitan's MW during HPL"),
)  # fmt: skip
_STEPS = {
    "availability": ("after availability", "× fraction of time parked"),
    "opt_in": ("after opt-in", "× fraction of parked capacity whose owners opted in"),
    "charging": ("after owner policy", "× fraction of that time the owner's policy allows"),
    "thermal": ("after thermal limits", "× sustained ÷ peak throughput while computing"),
}


def capacity_report(
    assumptions: CapacityAssumptions, factors: AvailabilityFactors
) -> CapacityReport:
    """The seed arithmetic under ``assumptions``, then the same after ``factors``.

    Every seed figure is proportional to the fleet, so each "after" figure is its seed figure
    × ``factors.product`` — identical to the seed with ``AvailabilityFactors.ones()``. That
    scales power by the thermal factor too, which assumes a throttled chip's draw falls with
    its throughput; the other three factors are fractions of time, which scale power exactly.
    """
    a = assumptions
    fleet_tops = a.vehicles * a.tops_per_vehicle
    values = {
        "fleet_int8_tops": fleet_tops,
        "fugaku_seed_units": fleet_tops / a.fugaku_tflops,
        "fugaku_int8": fleet_tops / a.fugaku_int8_tops,
        "el_capitan_seed_units": fleet_tops / a.el_capitan_tflops,
        "el_capitan_int8": fleet_tops / a.el_capitan_int8_tops,
        "fleet_gw": a.vehicles * a.kw_per_vehicle / 1e6,  # kW → GW
        "el_capitan_power": a.vehicles * a.kw_per_vehicle / 1e3 / a.el_capitan_mw,  # kW → MW
    }
    for key, value in values.items():
        if not math.isfinite(value) or value == 0:
            raise ValueError(f"{key} comes to {value!r}: the assumptions are out of range")

    seed = tuple(
        CapacityRow(label, values[key], unit, note, key) for key, label, _, unit, note in _ROWS
    )
    steps = tuple(
        CapacityRow(
            _STEPS[name][0], fleet_tops * running, "INT8 TOPS", _STEPS[name][1], f"after_{name}"
        )
        for name, running in zip(FACTOR_NAMES, factors.cumulative(), strict=True)
    )
    # The running product's last step is ``product`` itself, so the last step row and the
    # "average sustained available compute" row are the same float.
    product = factors.product
    scaled = tuple(
        CapacityRow(after or label, values[key] * product, unit, f"{note}; × every factor", key)
        for key, label, after, unit, note in _ROWS
    )
    return CapacityReport(seed, steps + scaled, factors, assumptions)


def _number(value: float) -> str:
    """A figure for people: 5.00e9, 11,363.6, 57.2, 1.00, 0.0912 (the model never rounds)."""
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if float(value).is_integer() and magnitude < 1e7:
        return f"{value:,.0f}"
    if magnitude >= 1e6 or magnitude < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    return f"{value:#.3g}"


def _row_lines(
    rows: tuple[CapacityRow, ...], *, notes: bool, shares: tuple[float, ...] = ()
) -> list[str]:
    # Value and unit first, in columns, so the figures line up; the long labels follow.
    lines = []
    for i, row in enumerate(rows):
        share = f" ({shares[i]:.1%} of nameplate)" if shares else ""
        lines.append(f"  {_number(row.value):>10} {row.unit:<10}  {row.label}{share}")
        if notes:
            lines.append(f"  {'':>10} {'':<10}    {row.note}")
    return lines
