"""What a store turn's result commits write, worked out in memory (a pure core, no SQL).

Committing chunk after chunk costs five or six statements each, and on a busy coordinator a
turn holds dozens of chunks. So a backend reads, in a few statements, the leases the chunks
name and the state of every request those leases were given, hands them here, and writes what
:func:`plan_commits` returns with one ``executemany`` per table.

The plan gives exactly what committing the chunks one by one, in order, would give: the first
result of a request wins, later ones count as duplicates; a chunk of a lease that is no longer
active commits what is still open but does not extend it; a chunk that answers every open
request of its lease finishes it; a late answer for requests another lease holds now closes
that lease once nothing in it is open (:attr:`CommitPlan.maybe_closed`, which the backend
checks after writing: results only ever close requests, so checking at the end finds what
checking after each chunk would). The one order that a plan cannot see is a lease closed by
another chunk's late answer and also committing in the same turn; then :func:`plan_commits`
returns None and the backend commits one by one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from idlefleet.coordinator.store.base import CommitOutcome, RequestResult, ResultCommit
from idlefleet.coordinator.store.sql_common import check_energy

__all__ = ["CommitPlan", "LeaseRow", "plan_commits"]


@dataclass(frozen=True)
class LeaseRow:
    """What committing needs of a stored lease."""

    vehicle_id: str
    batch_id: str
    seqs: tuple[int, ...]
    state: str


@dataclass
class CommitPlan:
    outcomes: list[CommitOutcome | Exception] = field(default_factory=list)
    """One per chunk, in order: its outcome, or why it was refused (nothing written for it)."""
    results: list[tuple[str, str, str, RequestResult]] = field(default_factory=list)
    """(batch, vehicle, lease, result) of every request that gets its result, in order."""
    completed: Counter[str] = field(default_factory=Counter)
    """Requests completed per vehicle."""
    extended: list[tuple[float, float, str, str]] = field(default_factory=list)
    """(deadline, energy_j, new state, lease) of every chunk of an active lease, in order."""
    energy_only: list[tuple[float, str]] = field(default_factory=list)
    """(energy_j, lease) of chunks of leases no longer active that reported energy."""
    maybe_closed: set[str] = field(default_factory=set)
    """Other leases that held requests answered here: close those with nothing left open."""


def plan_commits(
    commits: Sequence[ResultCommit],
    leases: Mapping[str, LeaseRow],
    states: Mapping[tuple[str, int], tuple[str, str | None]],
    now: float,
    lease_seconds: float,
) -> CommitPlan | None:
    """The writes and outcomes of committing ``commits`` in order (see the module docstring).

    ``leases``: the stored leases the chunks name, by id (missing: unknown). ``states``: the
    (state, holding lease) of every request of those leases, by (batch, seq). Returns None
    when the chunks must be committed one by one instead.
    """
    plan = CommitPlan()
    states = dict(states)
    lease_states = {lease_id: row.state for lease_id, row in leases.items()}
    for chunk in commits:
        try:
            check_energy(chunk.energy_j)  # refused before anything is written
        except ValueError as exc:
            plan.outcomes.append(exc)
            continue
        lease = leases.get(chunk.lease_id)
        if lease is None or lease.vehicle_id != chunk.vehicle_id:
            plan.outcomes.append(CommitOutcome(0, 0, False, None, unknown_lease=True))
            continue
        batch_id = lease.batch_id
        now_in = {seq: states[(batch_id, seq)] for seq in lease.seqs if (batch_id, seq) in states}
        mine = [r for r in chunk.results if r.seq in now_in]
        first: dict[int, RequestResult] = {}  # the first result of a request wins
        for r in mine:
            if r.seq not in first and now_in[r.seq][0] in ("pending", "leased"):
                first[r.seq] = r
        for seq, r in first.items():
            state, holder = now_in[seq]
            if state == "leased" and holder != chunk.lease_id:
                plan.maybe_closed.add(holder)  # type: ignore[arg-type]  # leased: has a holder
            states[(batch_id, seq)] = ("done", chunk.lease_id)
            plan.results.append((batch_id, chunk.vehicle_id, chunk.lease_id, r))
        if first:
            plan.completed[chunk.vehicle_id] += len(first)
        active = lease_states[chunk.lease_id] == "active"
        finished = False
        deadline: float | None = None
        if active:
            deadline = now + lease_seconds
            finished = not any(
                now_in.get(seq) == ("leased", chunk.lease_id) and seq not in first
                for seq in lease.seqs
            )
            new_state = "finished" if finished else "active"
            lease_states[chunk.lease_id] = new_state
            plan.extended.append((deadline, chunk.energy_j, new_state, chunk.lease_id))
        elif chunk.energy_j:
            plan.energy_only.append((chunk.energy_j, chunk.lease_id))
        plan.outcomes.append(
            CommitOutcome(
                len(first), len(mine) - len(first), active, deadline, lease_finished=finished
            )
        )
    if plan.maybe_closed & {chunk.lease_id for chunk in commits}:
        return None
    return plan
