"""How far the fleet model scales: vehicle-days per second and peak memory, on this machine.

Target (issue #4): 100 million vehicle-days in at most 60 s on a 2-core machine, measured on
1-10 million vehicle-days and reported as a rate, with peak memory at most 4 GiB via chunking.

Runs, in one process tree, what ``idlefleet sim`` runs (`simulate` with the default parameters
and worker processes):

1. 1,000,000 vehicles × 7 days (7 million vehicle-days), the issue's headline case;
2. 1,400,000 vehicles × 7 days (9.8 million vehicle-days);
3. 10,000,000 vehicles × 1 day (10 million vehicle-days, ten times the cars: memory must not
   grow with the fleet, since chunks bound it).

For each it prints wall time and vehicle-days per second. Wall time includes starting the
`spawn` worker processes (importing NumPy and the model, ~0.5-1 s), which a run of 100 million
vehicle-days pays once, so the bench also times that start-up alone (a run of two one-car
chunks) and projects 100 million vehicle-days as start-up + 10⁸ ÷ (the slowest run's rate
without its start-up), next to the plain extrapolation of the slowest rate with it. Peak memory
is the resident set of this process and of the largest worker; the workers run at once, so
their sum is bounded by ``self + workers × largest``. Because these machines are noisy, it also
times a fixed NumPy yardstick (elementwise float32 work of a similar mix) in the same run and
prints the simulation's rate relative to it, so runs on different days can be compared.

Usage: ``python bench/sim_scale.py [--workers 2] [--quick] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import numpy as np

from idlefleet.sim.params import SimParams
from idlefleet.sim.run import simulate

TARGET_VEHICLE_DAYS = 100_000_000
TARGET_S = 60.0
MEMORY_LIMIT_GIB = 4.0


def _rss_gib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def yardstick(seconds: float = 1.0) -> float:
    """Million float32 elementwise operations per second on one core (a fixed mix)."""
    rng = np.random.default_rng(0)
    a = rng.random(200_000, dtype=np.float32)
    b = rng.random(200_000, dtype=np.float32)
    ops, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        c = np.where(a < b, a * b + a, np.minimum(a, b) - b)
        np.maximum(c, 0, out=c)
        ops += 5 * a.size
    return ops / (time.perf_counter() - started) / 1e6


def run(vehicles: int, days: int, workers: int) -> dict[str, Any]:
    params = SimParams.build(vehicles=vehicles, days=days)
    result = simulate(params, workers=workers)
    vd = vehicles * days
    rate = vd / result.wall_s
    return {
        "vehicles": vehicles,
        "days": days,
        "vehicle_days": vd,
        "workers": result.workers,
        "chunk_vehicles": params.chunk_vehicles,
        "wall_s": result.wall_s,
        "vehicle_days_per_s": rate,
        "projected_s_for_100M": TARGET_VEHICLE_DAYS / rate,
        "parked_fraction": result.summary()["calibration"]["parked_fraction"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="only the 1M × 7 run")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, NumPy {np.__version__}"
    )
    before = yardstick()
    cases = [(1_000_000, 7)] + ([] if args.quick else [(1_400_000, 7), (10_000_000, 1)])
    runs = []
    for vehicles, days in cases:
        figures = run(vehicles, days, args.workers)
        runs.append(figures)
        vd, rate = figures["vehicle_days"], figures["vehicle_days_per_s"] / 1e6
        print(
            f"{vehicles:>12,} vehicles × {days} days = {vd:>11,} vehicle-days: "
            f"{figures['wall_s']:6.2f} s, {rate:5.2f} M vehicle-days/s "
            f"→ 100 M vehicle-days in {figures['projected_s_for_100M']:5.1f} s "
            f"({figures['workers']} workers, chunks of {figures['chunk_vehicles']:,})"
        )
    after = yardstick()
    self_gib = _rss_gib(resource.RUSAGE_SELF)
    child_gib = _rss_gib(resource.RUSAGE_CHILDREN)
    workers = max(r["workers"] for r in runs)
    bound = self_gib + workers * child_gib
    rate = min(r["vehicle_days_per_s"] for r in runs)
    stick = (before + after) / 2
    print(
        f"peak memory: this process {self_gib:.2f} GiB, largest worker {child_gib:.2f} GiB, "
        f"all together at most {bound:.2f} GiB (limit {MEMORY_LIMIT_GIB} GiB)"
    )
    print(
        f"yardstick: {before:,.0f} / {after:,.0f} M float32 ops/s per core (before / after); "
        f"slowest rate = {rate / stick:,.0f} vehicle-days per M yardstick ops"
    )
    plain = TARGET_VEHICLE_DAYS / rate
    startup = simulate(SimParams.build(vehicles=2, days=1, chunk_vehicles=1), args.workers).wall_s
    steady = min(r["vehicle_days"] / max(r["wall_s"] - startup, 1e-9) for r in runs)
    projected = startup + TARGET_VEHICLE_DAYS / steady
    print(
        f"start-up of {args.workers} workers alone: {startup:.2f} s; slowest rate without it "
        f"{steady / 1e6:.2f} M vehicle-days/s → 100 M vehicle-days in {projected:.1f} s"
    )
    met = projected <= TARGET_S and bound <= MEMORY_LIMIT_GIB
    print(
        f"target: 100 M vehicle-days ≤ {TARGET_S:.0f} s and ≤ {MEMORY_LIMIT_GIB} GiB: "
        f"{'met' if met else 'NOT met'} (projected {projected:.1f} s; the slowest run's rate "
        f"alone gives {plain:.1f} s)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "runs": runs,
                    "peak_gib": {"self": self_gib, "largest_worker": child_gib, "bound": bound},
                    "yardstick_mops": [before, after],
                    "projected_s": projected,
                    "target_met": met,
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
