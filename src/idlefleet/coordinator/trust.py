"""How much the coordinator trusts each car's results: a pure core (no I/O, no clock).

A car's results are checked by *probes*: a small part of a finished request (one input of an
embeddings request, a whole completion re-scored teacher-forced) re-run on a car of another
owner, or a *canary*, a probe whose answer is already known, slipped into a car's unit. This
module decides how many probes a chunk of results gets, and what a verdict does to a car.

- **Adaptive rate, with a floor.** A car is new until ``new_car_checks`` consecutive probes of
  its work agreed: until then every request it returns is probed. Then the share of its work
  re-run halves every ``new_car_checks`` agreeing probes, down to ``floor`` and never below.
  BOINC's falls as 1/sqrt(2T) with no floor (0.7% after 10,000 results), so a trusted host
  that turns bad is seldom caught; ours can fall fast because the floor, spread as below,
  keeps checking every unit. One wrong answer quarantines the car.
- **Who may verify.** While the fleet has fewer than ``min_trusted`` trusted cars (a new
  fleet), any car of another owner verifies; after that only trusted ones, and a car's trust
  grows only from agreeing with a trusted car (or a canary): two cars running the same wrong
  model (a cheaper one, say) agree with each other, and must not make each other trusted.
- **Probes spread over units.** The budget is a share of a chunk's *work* (inputs, tokens), and
  a probe is one request of it, and a unit of ``0.5 / floor`` requests or more gets at least
  one: a car corrupting whole units is caught at its first wrong unit, which
  re-running whole units at the same cost (``floor`` of the units) would not do.
- **Who judges.** A disagreement between a car and its verifier proves only that one of them
  is wrong: a *tie-break* goes to a third car, of a third owner and trusted (at least
  ``new_car_checks`` agreeing probes), and the side it agrees with wins. The loser is
  quarantined; a canary failed is a loss on its own (its answer was agreed by two owners).
  A tie-break that agrees with neither asks another, at most ``tiebreaks`` times, then the
  probe is dropped as inconclusive (counted, nobody punished).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "CarTrust",
    "TrustPolicy",
    "Verdict",
    "after_verdict",
    "check_rate",
    "probes_for",
]

Verdict = Literal["agree", "disagree"]


@dataclass(frozen=True)
class TrustPolicy:
    floor: float = 0.02
    """Share of a trusted car's work re-run on other cars, at least (the issue asks 2-5%)."""
    new_car_checks: int = 10
    """Consecutive agreeing probes before a car's rate starts to fall (BOINC: 10)."""
    canary_new: float = 1.0
    """Chance of a canary in each unit leased to a new car."""
    canary_trusted: float = 0.05
    """Chance of a canary in each unit leased to a trusted car."""
    max_probes_per_grant: int = 32
    """Probes (checks of other cars, canaries) slipped into one unit, at most (and at most a
    quarter of its requests)."""
    tiebreaks: int = 3
    """Tie-breaks asked for one disagreement before it is dropped as inconclusive."""
    probation_backlog: int = 64
    """A new car with this many of its results waiting for a verdict is leased nothing more
    until they are judged (it verifies others meanwhile): it cannot run far ahead of what was
    checked of it, and the checks of a fleet of new cars do not pile up."""
    probation_s: float = 30.0
    """A car is on probation at most this long after its probes last began to wait (none
    could be placed: no other car may verify it): then it works on, unverified."""
    verifier_seen_s: float = 30.0
    """A car that asked for work this recently may take probes: a car's results wait for
    probes (probation, a finished batch's hold) only while such a car, able to verify it, is
    about; with none (a fleet of one, the others parked outside their owners' hours) they
    would wait for nobody."""
    min_trusted: int = 3
    """Trusted cars the fleet needs before only trusted cars verify (bootstrap below it)."""

    def __post_init__(self) -> None:
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor must be in (0, 1], not {self.floor}")
        for name in ("canary_new", "canary_trusted"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        if self.new_car_checks < 1 or self.max_probes_per_grant < 1 or self.tiebreaks < 1:
            raise ValueError("new_car_checks, max_probes_per_grant and tiebreaks must be >= 1")


@dataclass(frozen=True)
class CarTrust:
    """What the coordinator knows of one car's record (a row of the store)."""

    vehicle_id: str
    streak: int = 0
    """Consecutive probes of its work that agreed (T)."""
    agreed: int = 0
    disagreed: int = 0
    """Probes of its work it lost (a tie-break or a canary)."""
    verified_through: float = 0.0
    """Commit time of the newest of its results a probe confirmed: its results up to here are
    out of escrow (a car that cheats later is caught on later work)."""
    quarantined_at: float | None = None
    reason: str | None = None

    @property
    def quarantined(self) -> bool:
        return self.quarantined_at is not None

    def trusted(self, policy: TrustPolicy) -> bool:
        return not self.quarantined and self.streak >= policy.new_car_checks


def check_rate(trust: CarTrust, policy: TrustPolicy) -> float:
    """The share of the car's work to re-run: all of it while new, then halving every
    ``new_car_checks`` agreeing probes, down to the floor."""
    if trust.streak < policy.new_car_checks:
        return 1.0
    halvings = (trust.streak - policy.new_car_checks) / policy.new_car_checks
    return max(policy.floor, 0.5 ** min(halvings, 64.0))


def probes_for(
    trust: CarTrust,
    policy: TrustPolicy,
    works: list[int],
    probe_work: float,
    rng: random.Random,
    strict: bool = False,
) -> list[int]:
    """Which requests of a chunk (their ``works``, in the workload's unit) to probe: indices.

    The expected probes are ``rate x work / probe_work``, rounded at random (so the share
    holds on average whatever the chunk size), at least one when ``rate x requests`` is 0.5 or
    more, at most one a request; ``new_car_checks`` of a new car's chunk; every request of a
    strict batch."""
    n = len(works)
    if n == 0:
        return []
    rate = check_rate(trust, policy)
    if strict:
        return list(range(n))
    if rate >= 1.0:
        # A new car: ``new_car_checks`` of every chunk (all of a small one) until that many
        # agreed. Re-running all of a first unit of 256 would double a new car's cost for no
        # more certainty: ten wrong answers are caught as surely as 256.
        return sorted(rng.sample(range(n), min(n, policy.new_car_checks)))
    expected = rate * sum(works) / max(probe_work, 1e-9)
    # At least one probe in every unit of 1 / (2 x rate) requests or more (25 at the 2% floor):
    # a car corrupting whole units is then caught at its first wrong one. (By work it would
    # depend on the unit's mix: a unit of 32 requests of one input and one of eight, 0.5 of a
    # probe apart, and a third of units went unprobed.)
    k = _rounded(expected, rng)
    if rate * n >= 0.5:
        k = max(1, k)
    return sorted(rng.sample(range(n), min(n, k)))


def _rounded(x: float, rng: random.Random) -> int:
    """``x`` rounded up or down at random, to ``x`` on average."""
    k = int(x)
    return k + 1 if rng.random() < x - k else k


def after_verdict(
    trust: CarTrust, verdict: Verdict, committed_at: float, now: float, reason: str = ""
) -> CarTrust:
    """The car's record after a probe of its work was judged (``committed_at``: when the
    probed result was committed). A lost probe quarantines the car."""
    if trust.quarantined:
        return trust
    if verdict == "agree":
        return replace(
            trust,
            streak=trust.streak + 1,
            agreed=trust.agreed + 1,
            verified_through=max(trust.verified_through, committed_at),
        )
    return replace(
        trust,
        streak=0,
        disagreed=trust.disagreed + 1,
        quarantined_at=now,
        reason=reason or "a probe of its results disagreed with two other owners' cars",
    )


def reinstated(trust: CarTrust) -> CarTrust:
    """An operator lets a quarantined car work again: as a new car (every result probed)."""
    return replace(trust, streak=0, quarantined_at=None, reason=None)
