"""Run the fuzz tests long: many more examples than CI's, a fresh random seed per round.

The fuzzers are the tests marked ``fuzz`` (``pytest -m fuzz``): schemathesis over every
operation of ``/openapi.json`` and its links, every car → coordinator message through the NATS
edge on SQLite and PostgreSQL, the cars' online replies, and hostile HTTP bodies, upload names,
batch input lines, state traces and owner policy files. CI runs each with a few dozen
examples, the same every time; this runs them with ``--examples`` each (random), round after
round with a new seed until ``--minutes`` are up, and prints what it ran and every failure with
the seed that replays it:

    .venv/bin/python scripts/fuzz.py --examples 20000 --minutes 60
    .venv/bin/python scripts/fuzz.py --examples 2000 -k edge_fuzz      # one fuzzer
    .venv/bin/python scripts/fuzz.py --examples 500 --seed 1234         # replay a round

Each round shows pytest's progress, each test's failure in full (hypothesis's falsifying
example and its ``@reproduce_failure`` blob) and the slowest tests; the exit status is 1 if
any round failed.
Needs PostgreSQL as the test suite does (``IDLEFLEET_TEST_PG_DSN``, else a private server).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", type=int, default=2000, help="examples per fuzz test and round"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="keep starting rounds (new seeds) until this much time has passed; 0: one round",
    )
    parser.add_argument("--seed", type=int, help="the first round's seed (default: random)")
    parser.add_argument("-k", dest="keyword", help="only the fuzz tests pytest -k selects")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")

    deadline = time.monotonic() + args.minutes * 60
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rounds: list[tuple[int, int, float]] = []  # (seed, exit status, seconds)
    while True:
        started = time.monotonic()
        status = _round(seed, args.examples, args.keyword, args.minutes)
        rounds.append((seed, status, time.monotonic() - started))
        print(
            f"round {len(rounds)}: seed {seed}, {args.examples} examples per test: "
            f"{'ok' if status == 0 else 'FAILED'} in {rounds[-1][2]:.0f} s",
            flush=True,
        )
        if time.monotonic() >= deadline:
            break
        seed = random.randrange(2**32)

    failed = [r for r in rounds if r[1] != 0]
    print(
        f"\n{len(rounds)} round(s), {len(failed)} failed"
        + "".join(
            f"\n  replay: scripts/fuzz.py --examples {args.examples} --seed {s}" for s, *_ in failed
        )
    )
    return 1 if failed else 0


def _round(seed: int, examples: int, keyword: str | None, minutes: float) -> int:
    """One pytest run of every fuzz test, its output shown as it goes (a failure's in full)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "fuzz",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:logging",  # the edge's refusals are logged: thousands of them
        "-rfE",
        "--durations=10",
        f"--hypothesis-seed={seed}",
        # CI's per-test bound (pyproject) is for CI's examples; a long round may take hours.
        f"--timeout={int(max(minutes * 60, 3600) * 4)}",
    ]
    if keyword:
        command += ["-k", keyword]
    env = {**os.environ, "IDLEFLEET_FUZZ_EXAMPLES": str(examples)}
    print(f"$ IDLEFLEET_FUZZ_EXAMPLES={examples} {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
