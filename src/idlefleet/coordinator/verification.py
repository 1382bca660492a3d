"""Verification: results from untrusted cars are checked by other cars, at a few percent of the
compute, and a car caught returning wrong results is quarantined.

How it runs (the decisions are :mod:`idlefleet.coordinator.trust`'s; this is the bookkeeping):

1. **Sample.** When a car's results are committed, :meth:`Verifier.sample` picks some requests
   (ten a unit while the car is new, all in a strict batch, a share of the work at least the
   floor otherwise) and asks the workload for a *probe* of each: a small part (one input of an
   embeddings request; a completion, re-scored teacher-forced) and the car's answer to it.
2. **Place.** :meth:`Verifier.place` slips queued probes into units leased to other cars: a
   car of another owner (when owners are distinct), allowed the original batch's purpose and
   data region, and the same model. To that car a probe is one more request of its unit.
   Units of new cars and, now and then, of trusted ones also get a *canary*: a probe whose
   answer two owners' cars agreed on before.
3. **Judge.** The answer comes back in the car's result chunks; :meth:`Verifier.answer` takes
   it out before the commit (it is not a request of the batch) and the workload judges it
   (``Workload.agree``, tighter within a hardware class). A disagreement goes to a trusted
   third car; the side it agrees with wins, and the loser is quarantined: it is leased no
   more, its results in running batches are redone by other cars, hooks tell the ledger not
   to pay them (``on_quarantine``) and when earnings leave escrow (``on_verified``).

What it costs: sampling reads nothing (payloads are remembered from the grant); a verdict
writes one trust row; an idle car costs nothing. The queue and probes in flight live in the
replica's memory (a restart loses a few samples, which only means a few results are not
checked); strict batches are checked from the store, so they survive restarts and replicas.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from idlefleet.coordinator.seq_mask import SEQ_BITS
from idlefleet.coordinator.store import BatchRecord, Store
from idlefleet.coordinator.store.verification_sql import VerdictRow
from idlefleet.coordinator.trust import (
    CarTrust,
    TrustPolicy,
    after_verdict,
    check_rate,
    probes_for,
    reinstated,
)
from idlefleet.protocol.messages import hardware_class
from idlefleet.workloads import Workload, by_endpoint
from idlefleet.workloads.base import Probe

log = logging.getLogger(__name__)

__all__ = ["STRICT_METADATA", "Verifier", "is_strict"]

STRICT_METADATA = ("verification", "strict")
"""A batch whose ``metadata`` has ``"verification": "strict"`` gets nothing unverified in its
output file: every result is checked, and the batch is finalised only when all agree."""

MAX_QUEUED = 100_000
"""Probes waiting for a car, at most (the oldest non-strict ones are dropped past it)."""
QUEUE_AGE_S = 600.0
"""A probe that found no car in this long is dropped (counted ``expired``)."""
TIERS = (0, 1, 2)
SCAN = 256
"""Queued probes looked at per grant (cheap whatever the queue's length)."""
ALONE_PROBES = 64
"""Probes in a unit of probes alone, at most."""
SUBJECT_PROBES = 8
"""Probes of one car's results in one unit, at most: a car that lies on a unit (it cannot tell
probes from requests) vouches for few results of any one car, and a lie is seen by others."""
CANARY_POOL = 1_000
"""Canaries kept per model (the newest agreed probes)."""


def is_strict(metadata: Mapping[str, str] | None) -> bool:
    key, value = STRICT_METADATA
    return bool(metadata) and (metadata or {}).get(key) == value


Kind = Literal["check", "tiebreak", "canary"]


@dataclass
class _Check:
    id: int
    kind: Kind
    model: str
    workload: Workload
    probe: Probe
    purpose: str
    data_region: str
    created_at: float
    subject: str | None = None
    """The car whose result is judged (None: a canary, which judges whoever answers it)."""
    subject_class: str = ""
    batch_id: str | None = None
    seq: int | None = None
    committed_at: float = 0.0
    strict: bool = False
    excluded_cars: set[str] = field(default_factory=set)
    excluded_owners: set[str] = field(default_factory=set)
    first: tuple[str, str, bytes] | None = None
    """A tie-break's first verifier: (car, class, answer)."""
    tiebreaks: int = 0


@dataclass(frozen=True)
class _Placed:
    check: _Check
    vehicle_id: str
    car_class: str
    deadline: float


@dataclass(frozen=True)
class CarProfile:
    owner: str
    hardware: Mapping[str, Any]


class Verifier:
    def __init__(
        self,
        store: Store,
        policy: TrustPolicy | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        distinct_owners: bool = True,
        digests: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or TrustPolicy()
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.distinct_owners = distinct_owners
        """False: any other car may verify a car (a fleet of one owner, e.g. the embedded one);
        True: only a car of another owner."""
        self.digests = digests or dict
        """The current release of each model, by digest (part of a car's hardware class)."""
        self.on_quarantine: list[Callable[[str, float, int], None]] = []
        """Called (car, quarantined_at, results redone) when a car is quarantined: its results
        after its ``verified_through`` are not to be paid (the ledger's hook)."""
        self.on_verified: list[Callable[[str, float], None]] = []
        """Called (car, verified_through) when a probe confirms a car's results up to a time:
        its earnings up to then leave escrow (the ledger's hook)."""
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._queue: dict[tuple[str, int], deque[_Check]] = {}
        """Probes waiting for a car, by model and tier (``_tier``), oldest first."""
        self._placed: dict[str, dict[int, _Placed]] = {}
        self._alone: set[str] = set()
        self._held: dict[str, float] = {}
        self.hold_s = 15.0
        """How long a batch whose work is done waits for the probes of its results."""
        self._trust: dict[str, CarTrust] = {}
        self._profiles: dict[str, CarProfile] = {}
        self._quarantined: set[str] = set()
        self._trusted: set[str] = set()
        """Cars known trusted (this replica's view): only they verify, once there are
        ``policy.min_trusted`` of them."""
        self._canaries: dict[str, deque[_Check]] = {}
        self._strict: dict[str, bool] = {}
        self._strict_queued: set[tuple[str, int, str]] = set()
        self._pending: Counter[str] = Counter()
        self._pending_since: dict[str, float] = {}
        """When each car's pending probes last rose from none."""
        """Probes of each car's results not yet judged (queued or placed)."""
        self._dirty: dict[str, CarTrust] = {}
        self._verdicts: list[VerdictRow] = []
        self._asked: OrderedDict[str, float] = OrderedDict()
        """When each car last asked for work (latest last), for ``policy.verifier_seen_s``."""

    # -- cars ----------------------------------------------------------------------------------
    def registered(self, vehicle_id: str, hardware: Mapping[str, Any]) -> None:
        """A car registered (its hardware class is known from here on)."""
        with self._lock:
            profile = self._profiles.get(vehicle_id)
            owner = profile.owner if profile else self._owner(vehicle_id)
            self._profiles[vehicle_id] = CarProfile(owner, dict(hardware))

    def profile(self, vehicle_id: str) -> CarProfile:
        with self._lock:
            profile = self._profiles.get(vehicle_id)
        if profile is not None:
            return profile
        record = self.store.get_vehicle(vehicle_id)
        profile = CarProfile(self._owner(vehicle_id), record.hardware if record else {})
        with self._lock:
            return self._profiles.setdefault(vehicle_id, profile)

    def _owner(self, vehicle_id: str) -> str:
        if not self.distinct_owners:
            return f"car:{vehicle_id}"
        enrolment = self.store.get_enrolment(vehicle_id)
        return enrolment.owner if enrolment is not None else f"car:{vehicle_id}"

    def class_of(self, vehicle_id: str, model: str) -> str:
        return hardware_class(self.profile(vehicle_id).hardware, self.digests().get(model))

    def trust(self, vehicle_id: str) -> CarTrust:
        with self._lock:
            known = self._trust.get(vehicle_id)
        if known is not None:
            return known
        stored = self.store.get_trust([vehicle_id]).get(vehicle_id) or CarTrust(vehicle_id)
        with self._lock:
            known = self._trust.setdefault(vehicle_id, stored)
            if known.quarantined:
                self._quarantined.add(vehicle_id)
            elif known.trusted(self.policy):
                self._trusted.add(vehicle_id)
            return known

    def asking(self, vehicle_ids: Iterable[str]) -> None:
        """Cars asked for work (each may take probes): O(1) a car, stale ones forgotten."""
        now = self.clock()
        with self._lock:
            for vehicle_id in vehicle_ids:
                self._asked[vehicle_id] = now
                self._asked.move_to_end(vehicle_id)
            while self._asked:
                vehicle_id, at = next(iter(self._asked.items()))
                if now - at <= self.policy.verifier_seen_s:
                    break
                del self._asked[vehicle_id]

    def _verifier_about(self, subject: str) -> bool:
        """Whether a car that may verify this car's results asked for work lately (call with
        the lock held). Newest askers first: it usually stops at the first or second."""
        now = self.clock()
        profile = self._profiles.get(subject)
        bootstrapping = len(self._trusted) < self.policy.min_trusted
        for vehicle_id, at in reversed(self._asked.items()):
            if now - at > self.policy.verifier_seen_s:
                return False
            if vehicle_id == subject or vehicle_id in self._quarantined:
                continue
            if not bootstrapping and vehicle_id not in self._trusted:
                continue
            other = self._profiles.get(vehicle_id)
            if profile is not None and other is not None and other.owner == profile.owner:
                continue
            return True
        return False

    def on_probation(self, vehicle_id: str) -> bool:
        """Whether a new car has too many of its results waiting for a verdict to be leased
        more (it gets probes of others' work meanwhile)."""
        with self._lock:
            if self._pending[vehicle_id] < self.policy.probation_backlog:
                return False
            if not self._verifier_about(vehicle_id):
                return False  # no car about could verify it: its probes wait for nobody
            # Not for ever: with no car able to verify it (the only other car opted out, a
            # fleet of one), a car on probation longer than this works on unverified.
            since = self._pending_since.get(vehicle_id)
            if since is not None and self.clock() - since > self.policy.probation_s:
                return False
            trust = self._trust.get(vehicle_id)
            return trust is None or not trust.trusted(self.policy)

    def _resolved(self, check: _Check) -> None:
        """A probe of a car's result is judged or given up: one less pending."""
        if check.subject is not None and check.kind != "canary":
            with self._lock:
                left = self._pending[check.subject] - 1
                if left > 0:
                    self._pending[check.subject] = left
                else:
                    del self._pending[check.subject]
                    self._pending_since.pop(check.subject, None)

    def bootstrapping(self) -> bool:
        """Whether the fleet has too few trusted cars for only them to verify."""
        with self._lock:
            return len(self._trusted) < self.policy.min_trusted

    def is_quarantined(self, vehicle_id: str) -> bool:
        with self._lock:
            return vehicle_id in self._quarantined

    def refresh(self) -> None:
        """Learn quarantines other replicas decided, and drop what waited too long (the
        coordinator calls this every few seconds)."""
        self.flush()
        quarantined = {t.vehicle_id: t for t in self.store.list_trust(quarantined_only=True)}
        now = self.clock()
        with self._lock:
            for vehicle_id, record in quarantined.items():
                self._trust[vehicle_id] = record
                self._trusted.discard(vehicle_id)
            learnt = quarantined.keys() - self._quarantined
            lifted = self._quarantined - quarantined.keys()
            for vehicle_id in lifted:
                self._trust.pop(vehicle_id, None)
            self._quarantined = set(quarantined)
            for queue in self._queue.values():
                while queue and not queue[0].strict and now - queue[0].created_at > QUEUE_AGE_S:
                    self._resolved(queue.popleft())
                    self.counters["expired"] += 1
            overdue = [
                (lease_id, seq)
                for lease_id, probes in self._placed.items()
                for seq, placed in probes.items()
                if placed.deadline < now
            ]
            for lease_id, seq in overdue:
                self._return(self._placed[lease_id].pop(seq).check)
                if not self._placed[lease_id]:
                    del self._placed[lease_id]
                    self._alone.discard(lease_id)
        recent = [v for v in learnt if (quarantined[v].quarantined_at or 0) > now - QUEUE_AGE_S]
        for vehicle_id in recent:  # caught by another replica: what it committed here, redone
            redone = self.store.redo_results(vehicle_id)
            withdrawn = self.store.withdraw_verdicts(vehicle_id)  # and what it vouched for here
            with self._lock:
                self.counters["redone"] += redone
                self.counters["withdrawn"] += withdrawn

    def flush(self) -> int:
        """Write what was judged since the last flush (trust rows, strict batches' verdicts)
        in one transaction; the coordinator calls this every second. Returns rows written."""
        with self._lock:
            records, self._dirty = list(self._dirty.values()), {}
            verdicts, self._verdicts = self._verdicts, []
        if not records and not verdicts:
            return 0
        try:
            self.store.record_verification(records, verdicts, self.clock())
        except Exception:
            with self._lock:  # kept for the next flush (newer judgements win)
                for record in records:
                    self._dirty.setdefault(record.vehicle_id, record)
                self._verdicts[:0] = verdicts
            raise
        return len(records) + len(verdicts)

    def reinstate(self, vehicle_id: str) -> CarTrust:
        """Let a quarantined car work again, as a new car (every result probed)."""
        record = reinstated(self.trust(vehicle_id))
        self.store.put_trust([record], self.clock())
        with self._lock:
            self._trust[vehicle_id] = record
            self._quarantined.discard(vehicle_id)
            self._trusted.discard(vehicle_id)
        return record

    # -- 1. sample -----------------------------------------------------------------------------
    def sample(
        self,
        vehicle_id: str,
        batch_id: str,
        model: str,
        workload: Workload,
        purpose: str,
        data_region: str,
        results: Sequence[tuple[int, Any, bytes]],
    ) -> int:
        """Queue probes of a car's committed results ((seq, payload, result) each; payload
        None: not known here, read from the store). Returns how many were queued."""
        if not results:
            return 0
        trust = self.trust(vehicle_id)
        strict = self._is_strict(batch_id)
        works = [workload.work(p, r) if p is not None else 1 for _, p, r in results]
        with self._lock:
            # Strict batches' checks are the customer's choice (every result re-run): counted
            # apart, so that ``overhead`` is what verification costs everyone else.
            self.counters["work_strict" if strict else "work"] += sum(works)
        picked = probes_for(
            trust, self.policy, works, self._probe_work(model), self.rng, strict=strict
        )
        if not picked:
            return 0
        missing = [results[i][0] for i in picked if results[i][1] is None]
        payloads = self.store.request_payloads(batch_id, missing) if missing else {}
        now = self.clock()
        subject_class = self.class_of(vehicle_id, model)
        owner = self.profile(vehicle_id).owner
        queued = []
        for i in picked:
            seq, payload, result = results[i]
            payload = payloads.get(seq) if payload is None else payload
            if payload is None:
                continue
            try:
                probe = workload.probe(payload, result, self.rng.randrange(1 << 30))
            except ValueError:
                continue  # a workload that cannot be verified yet
            queued.append(
                _Check(
                    id=next(self._ids),
                    kind="check",
                    model=model,
                    workload=workload,
                    probe=probe,
                    purpose=purpose,
                    data_region=data_region,
                    created_at=now,
                    subject=vehicle_id,
                    subject_class=subject_class,
                    batch_id=batch_id,
                    seq=seq,
                    committed_at=now,
                    strict=strict,
                    excluded_cars={vehicle_id},
                    excluded_owners={owner},
                )
            )
        with self._lock:
            for check in queued:
                self._enqueue(check)
                self._pending[vehicle_id] += 1
                self._pending_since.setdefault(vehicle_id, now)
                if strict and check.seq is not None:  # the gate probes it no second time
                    self._strict_queued.add((batch_id, check.seq, vehicle_id))
            self.counters["sampled"] += len(queued)
        return len(queued)

    def _probe_work(self, model: str) -> float:
        with self._lock:
            n = self.counters[f"probes:{model}"]
            return self.counters[f"probe_work:{model}"] / n if n else 1.0

    def _is_strict(self, batch_id: str) -> bool:
        with self._lock:
            known = self._strict.get(batch_id)
        if known is None:
            batch = self.store.get_batch(batch_id)
            known = batch is not None and is_strict(batch.metadata)
            with self._lock:
                self._strict[batch_id] = known
        return known

    def _tier(self, check: _Check) -> int:
        """Which queue a probe waits in: tie-breaks first (a car may be lying), then probes of
        trusted cars' results (each stands for a unit that no other probe checks), then the
        rest (new cars' every result, strict batches')."""
        if check.kind == "tiebreak":
            return 0
        subject = self._trust.get(check.subject or "")
        if not check.strict and subject is not None and subject.trusted(self.policy):
            return 1
        return 2

    def _enqueue(self, check: _Check) -> None:
        queue = self._queue.setdefault((check.model, self._tier(check)), deque())
        if len(queue) >= MAX_QUEUED:
            for i, old in enumerate(queue):
                if not old.strict:
                    del queue[i]
                    self._resolved(old)
                    self.counters["dropped"] += 1
                    break
        queue.append(check)

    def _return(self, check: _Check) -> None:
        """A placed probe came back unanswered (the unit ended): queue it again, first."""
        if check.kind == "canary":
            return
        if check.subject is not None and check.subject in self._quarantined:
            return
        self._queue.setdefault((check.model, self._tier(check)), deque()).appendleft(check)

    # -- 2. place ------------------------------------------------------------------------------
    def place(
        self,
        vehicle_id: str,
        lease_id: str,
        model: str,
        seqs: Sequence[int],
        purposes: Iterable[str],
        data_regions: Iterable[str],
        deadline: float,
        alone: bool = False,
    ) -> list[tuple[int, Any]]:
        """Probes to add to a unit being leased to this car: (seq, payload) each, numbered at
        random apart from the unit's ``seqs`` (as the car sees them, masked). ``alone``: a
        unit of probes only, of one purpose and data region (and a canary, if one fits)."""
        if vehicle_id in self._quarantined:
            return []
        trust = self.trust(vehicle_id)
        profile = self.profile(vehicle_id)
        klass = self.class_of(vehicle_id, model)
        purposes, regions = set(purposes), set(data_regions)
        trusted = trust.trusted(self.policy)
        # While the fleet has too few trusted cars, any other owner's car verifies and breaks
        # ties too: a third car of a third owner. Else a new cheater that took all of a
        # batch's work (its probes disagreeing with new honest cars) waits for a trusted car
        # that never comes, and a strict batch with it.
        may_verify = trusted or self.bootstrapping()
        # A quarter of the unit at most: probes are spread over many cars' units (every car
        # verifies others), and a unit is never mostly probes.
        most = self.policy.max_probes_per_grant
        limit = ALONE_PROBES if alone else min(most, max(1, len(seqs) // 4))
        taken: list[_Check] = []
        per_subject: Counter[str] = Counter()
        with self._lock:
            scanned = 0
            for tier in TIERS:
                queue = self._queue.get((model, tier))
                if not queue or scanned >= SCAN or len(taken) >= limit:
                    continue
                keep: list[_Check] = []
                look = min(SCAN - scanned, len(queue))
                scanned += look
                for _ in range(look):
                    if len(taken) >= limit:
                        break
                    check = queue.popleft()
                    if check.subject is not None and check.subject in self._quarantined:
                        continue  # its results are redone anyway
                    if (
                        len(taken) < limit
                        and (
                            not alone
                            or not taken
                            or (check.purpose, check.data_region)
                            == (taken[0].purpose, taken[0].data_region)
                        )
                        and vehicle_id not in check.excluded_cars
                        and profile.owner not in check.excluded_owners
                        and check.purpose in purposes
                        and check.data_region in regions
                        and may_verify  # probes and tie-breaks alike
                        and per_subject[check.subject or ""] < SUBJECT_PROBES
                    ):
                        taken.append(check)
                        per_subject[check.subject or ""] += 1
                    else:
                        keep.append(check)
                queue.extendleft(reversed(keep))
            chance = self.policy.canary_trusted if trusted else self.policy.canary_new
            # A unit that vouches for results of a strict batch, or only for others' results,
            # always gets a canary if one fits: a car that lies on it is caught by it at once,
            # and its agreements are withdrawn (``_quarantine``) before a strict batch ends.
            forced = alone or any(c.strict for c in taken)
            if forced:
                chance = 1.0
            if alone and taken:
                purposes, regions = {taken[0].purpose}, {taken[0].data_region}
            pool = self._canaries.get(model)
            if pool and (taken or not alone) and self.rng.random() < chance:
                candidates = [
                    c
                    for c in itertools.islice(reversed(pool), 64)
                    if c.purpose in purposes
                    and c.data_region in regions
                    and vehicle_id not in c.excluded_cars
                ]
                if candidates:
                    canary = self.rng.choice(candidates)
                    # One forced by a strict batch's probes is that customer's cost (counted
                    # with strict work, not in ``overhead``).
                    strict = forced and any(c.strict for c in taken)
                    taken.append(
                        replace(
                            canary,
                            id=next(self._ids),
                            kind="canary",
                            created_at=self.clock(),
                            strict=strict,
                        )
                    )
            if not taken:
                return []
            placed = self._placed.setdefault(lease_id, {})
            used = set(seqs)
            out = []
            for check in taken:
                # Numbered as the car sees the unit's requests: at random (``seq_mask``).
                seq = self.rng.randrange(1 << SEQ_BITS)
                while seq in used:
                    seq = self.rng.randrange(1 << SEQ_BITS)
                used.add(seq)
                placed[seq] = _Placed(check, vehicle_id, klass, deadline)
                out.append((seq, check.probe.payload))
                self.counters[f"placed_{check.kind}"] += 1
            return out

    def waiting(self, models: Iterable[str]) -> str | None:
        """A model of these with probes queued (cheap: a dict lookup a model)."""
        with self._lock:
            return next((m for m in models for t in TIERS if self._queue.get((m, t))), None)

    def place_alone(
        self,
        vehicle_id: str,
        lease_id: str,
        models: Sequence[str],
        purposes: Iterable[str],
        data_regions: Iterable[str],
        deadline: float,
    ) -> tuple[str, list[tuple[int, Any]], str, str] | None:
        """A unit of probes alone, for a car that asked for work when there was none (the
        checks of a batch's last results, which would otherwise wait for more work): (model,
        (seq, payload) each, purpose, data region), or None. The lease exists only here."""
        model = self.waiting(models)
        if model is None:
            return None
        placed = self.place(
            vehicle_id, lease_id, model, [], purposes, data_regions, deadline, alone=True
        )
        if not placed:
            return None
        with self._lock:
            self._alone.add(lease_id)
            first = self._placed[lease_id][placed[0][0]].check
        return model, placed, first.purpose, first.data_region

    def lease_model(self, lease_id: str) -> str | None:
        """The model of a lease's probes (None: it has none here)."""
        with self._lock:
            placed = self._placed.get(lease_id)
            return next(iter(placed.values())).check.model if placed else None

    def is_alone(self, lease_id: str) -> bool:
        """Whether a lease is a unit of probes alone (not in the store)."""
        with self._lock:
            return lease_id in self._alone

    def probe_seqs(self, lease_id: str) -> Mapping[int, Any] | None:
        """The probes of a lease: their payloads by seq (None: it has none)."""
        with self._lock:
            placed = self._placed.get(lease_id)
            if not placed:
                return None
            return {seq: p.check.probe.payload for seq, p in placed.items()}

    def unanswered(self, lease_id: str, seqs: Iterable[int] | None = None) -> None:
        """The car gave these probes back (or the whole lease, ``seqs`` None): queue again."""
        with self._lock:
            placed = self._placed.get(lease_id)
            if not placed:
                return
            for seq in list(placed) if seqs is None else [s for s in seqs if s in placed]:
                self._return(placed.pop(seq).check)
            if not placed:
                del self._placed[lease_id]
                self._alone.discard(lease_id)

    # -- 3. judge ------------------------------------------------------------------------------
    def answer(self, vehicle_id: str, lease_id: str, seq: int, answer: bytes | None) -> None:
        """A car's answer to a probe (None: malformed, refused by the workload's check)."""
        with self._lock:
            placed = self._placed.get(lease_id, {}).pop(seq, None)
            if lease_id in self._placed and not self._placed[lease_id]:
                del self._placed[lease_id]
                self._alone.discard(lease_id)
        if placed is None or placed.vehicle_id != vehicle_id:
            return
        if vehicle_id in self._quarantined:
            self._return(placed.check)
            return
        check = placed.check
        with self._lock:
            self.counters["answered"] += 1
            self.counters["probe_work_strict" if check.strict else "probe_work"] += check.probe.work
            self.counters[f"probes:{check.model}"] += 1
            self.counters[f"probe_work:{check.model}"] += check.probe.work
        if check.kind == "canary":
            self._judge_canary(check, vehicle_id, placed.car_class, answer)
        elif check.kind == "check":
            self._judge_check(check, vehicle_id, placed.car_class, answer)
        else:
            self._judge_tiebreak(check, vehicle_id, placed.car_class, answer)

    def _agree(
        self,
        check: _Check,
        reference: bytes,
        ref_class: str,
        answer: bytes | None,
        answer_class: str,
    ) -> bool:
        if answer is None:
            return False
        try:
            return check.workload.agree(
                check.model, check.probe.payload, reference, answer, ref_class == answer_class
            )
        except Exception:  # a hostile answer must not break judging
            log.exception("judging a probe of %s failed", check.model)
            return False

    def _judge_canary(
        self, check: _Check, vehicle_id: str, klass: str, answer: bytes | None
    ) -> None:
        now = self.clock()
        if self._agree(check, check.probe.reference, check.subject_class, answer, klass):
            self.counters["canary_passed"] += 1
            self._verdict(vehicle_id, "agree", 0.0, now)
        else:
            self.counters["canary_failed"] += 1
            self._verdict(
                vehicle_id,
                "disagree",
                now,
                now,
                "failed a canary (a probe whose answer two owners' cars agreed on)",
            )

    def _judge_check(
        self, check: _Check, vehicle_id: str, klass: str, answer: bytes | None
    ) -> None:
        assert check.subject is not None
        now = self.clock()
        if self._agree(check, check.probe.reference, check.subject_class, answer, klass):
            self.counters["agreed"] += 1
            if not (self.trust(vehicle_id).trusted(self.policy) or self.bootstrapping()):
                # Two untrusted cars agreeing proves little (the same wrong model agrees with
                # itself): the probe goes to a trusted car.
                again = replace(
                    check, id=next(self._ids), excluded_cars=check.excluded_cars | {vehicle_id}
                )
                with self._lock:
                    self._enqueue(again)
                return
            self._verdict(
                check.subject, "agree", check.committed_at, now, check=check, verifier=vehicle_id
            )
            # The verifier's answer agreed too: its streak grows (its own results are not
            # thereby verified: verified_through stays).
            self._verdict(vehicle_id, "agree", 0.0, now)
            self._add_canary(check, vehicle_id, klass, answer)
            self._resolved(check)
            return
        self.counters["disagreed"] += 1
        tiebreak = replace(
            check,
            id=next(self._ids),
            kind="tiebreak",
            first=(vehicle_id, klass, answer or b""),
            excluded_cars=check.excluded_cars | {vehicle_id},
            excluded_owners=check.excluded_owners | {self.profile(vehicle_id).owner},
            tiebreaks=1,
        )
        with self._lock:
            self._enqueue(tiebreak)

    def _judge_tiebreak(
        self, check: _Check, vehicle_id: str, klass: str, answer: bytes | None
    ) -> None:
        assert check.subject is not None and check.first is not None
        now = self.clock()
        first_car, first_class, first_answer = check.first
        with_subject = self._agree(check, check.probe.reference, check.subject_class, answer, klass)
        with_first = self._agree(check, first_answer, first_class, answer, klass)
        self.counters["tiebreaks"] += 1
        # An untrusted tie-breaker (while the fleet bootstraps) may side against the subject
        # with the first verifier: two cars against one. It may not condemn the first
        # verifier on its own word: an answer that re-ran nothing (a chat answer of zero
        # misses) agrees with any result, so the tie goes on to another car instead.
        if with_subject and not with_first and not self.trust(vehicle_id).trusted(self.policy):
            with_subject = False
        if with_subject and not with_first:
            self._verdict(
                check.subject, "agree", check.committed_at, now, check=check, verifier=vehicle_id
            )
            self._verdict(vehicle_id, "agree", 0.0, now)
            self._verdict(
                first_car,
                "disagree",
                now,
                now,
                "its answer to a probe of another car's work disagreed with two cars",
            )
            self._resolved(check)
        elif with_first and not with_subject:
            self._verdict(
                check.subject,
                "disagree",
                now,
                now,
                "a probe of its results disagreed with two other owners' cars",
                check=check,
                verifier=vehicle_id,
            )
            self._verdict(vehicle_id, "agree", 0.0, now)
            self._verdict(first_car, "agree", 0.0, now)
        elif check.tiebreaks < self.policy.tiebreaks:
            again = replace(
                check,
                id=next(self._ids),
                excluded_cars=check.excluded_cars | {vehicle_id},
                excluded_owners=check.excluded_owners | {self.profile(vehicle_id).owner},
                tiebreaks=check.tiebreaks + 1,
            )
            with self._lock:
                self._enqueue(again)
        else:
            self.counters["inconclusive"] += 1
            self._resolved(check)
            if check.strict and check.batch_id is not None and check.seq is not None:
                with self._lock:  # the strict batch's gate probes it again
                    self._strict_queued.discard((check.batch_id, check.seq, check.subject))
            log.warning(
                "probe of %s's result %s/%s inconclusive after %d tie-breaks",
                check.subject,
                check.batch_id,
                check.seq,
                check.tiebreaks,
            )

    def _add_canary(self, check: _Check, verifier: str, klass: str, answer: bytes | None) -> None:
        """Keep an agreed probe as a canary, its known answer the trusted verifier's: judged
        answer against answer, which a lazy car cannot pass by answering what a result makes
        look right (a chat probe's all-zero misses agree with any result)."""
        if answer is None or not self.trust(verifier).trusted(self.policy):
            return  # a canary's answer must be one a trusted car gave
        canary = replace(
            check,
            probe=replace(check.probe, reference=answer),
            subject_class=klass,
            excluded_cars={check.subject or "", verifier},
            strict=False,
        )
        with self._lock:
            pool = self._canaries.setdefault(check.model, deque(maxlen=CANARY_POOL))
            pool.append(canary)

    def _verdict(
        self,
        vehicle_id: str,
        verdict: Literal["agree", "disagree"],
        committed_at: float,
        now: float,
        reason: str = "",
        check: _Check | None = None,
        verifier: str | None = None,
    ) -> None:
        before = self.trust(vehicle_id)
        if before.quarantined:
            return
        after = after_verdict(before, verdict, committed_at, now, reason)
        with self._lock:
            self._trust[vehicle_id] = after
            if after.quarantined:
                self._quarantined.add(vehicle_id)
                self._trusted.discard(vehicle_id)
            elif after.trusted(self.policy):
                self._trusted.add(vehicle_id)
        with self._lock:
            self._dirty[vehicle_id] = after
            if check is not None and check.strict and check.batch_id is not None:
                assert check.seq is not None
                self._verdicts.append(
                    VerdictRow(check.batch_id, check.seq, vehicle_id, verdict, verifier, now)
                )
                self._strict_queued.discard((check.batch_id, check.seq, vehicle_id))
        if after.quarantined:
            self.flush()  # a quarantine is written at once (other replicas learn it)
            self._quarantine(vehicle_id, after)
        elif after.verified_through > before.verified_through:
            for hook in self.on_verified:
                hook(vehicle_id, after.verified_through)

    def _quarantine(self, vehicle_id: str, record: CarTrust) -> None:
        redone = self.store.redo_results(vehicle_id)
        # What it vouched for in running batches is unverified again: a strict batch probes
        # those results anew (a cheater agrees with a cheater running the same wrong model).
        withdrawn = self.store.withdraw_verdicts(vehicle_id)
        with self._lock:
            self.counters["quarantined"] += 1
            self.counters["redone"] += redone
            self.counters["withdrawn"] += withdrawn
            for queue in self._queue.values():
                for check in [c for c in queue if c.subject == vehicle_id]:
                    queue.remove(check)
            # Probes it holds will not be answered (or not believed): placed again at once, not
            # when its lease runs out (a strict batch would wait that long for them).
            for lease_id, probes in list(self._placed.items()):
                if any(p.vehicle_id == vehicle_id for p in probes.values()):
                    del self._placed[lease_id]
                    self._alone.discard(lease_id)
                    for placed in probes.values():
                        self._return(placed.check)
            self._strict_queued = {k for k in self._strict_queued if k[2] != vehicle_id}
            self._pending.pop(vehicle_id, None)
            self._pending_since.pop(vehicle_id, None)
        log.warning(
            "quarantined car %s (%s); %d of its results redone", vehicle_id, record.reason, redone
        )
        for hook in self.on_quarantine:
            hook(vehicle_id, record.quarantined_at or self.clock(), redone)

    # -- strict batches ------------------------------------------------------------------------
    def may_finalize(self, batch: BatchRecord) -> bool:
        """The batch service's finalisation gate: a strict batch waits for its verdicts; any
        other for the probes of its results this replica has under way, at most ``hold_s``
        (a car caught by one of them has its results redone before the output is written)."""
        if not is_strict(batch.metadata):
            return self._unchecked_done(batch.id)
        workload = by_endpoint(batch.endpoint)
        if workload is None:
            return True
        return self.strict_ready(batch.id, workload, batch.purpose, batch.data_region)

    def _unchecked_done(self, batch_id: str) -> bool:
        now = self.clock()
        with self._lock:
            placed = any(
                p.check.batch_id == batch_id and p.check.kind != "canary"
                for placed in self._placed.values()
                for p in placed.values()
            )
            subjects = {
                c.subject
                for q in self._queue.values()
                for c in q
                if c.batch_id == batch_id and c.subject is not None
            }
            if not placed and not subjects:
                self._held.pop(batch_id, None)
                return True
            # Worth waiting for: its probes on cars now, and those queued that a car about
            # may take (with none about, they would wait for nobody).
            worth = placed or any(self._verifier_about(s) for s in subjects)
            since = self._held.setdefault(batch_id, now)
            if worth and now - since < self.hold_s:
                return False
            self._held.pop(batch_id, None)
            self.counters["finalised_unchecked"] += 1
            return True

    def strict_ready(
        self, batch_id: str, workload: Workload, purpose: str, data_region: str
    ) -> bool:
        """Whether a strict batch whose work is done may be finalised: every result agreed.
        If not, probes of the results that lack a verdict are queued (once each)."""
        self.flush()
        waiting = self.store.unverified_requests(batch_id, limit=1000)
        if not waiting:
            return True
        now = self.clock()
        for vehicle_id in {r.vehicle_id for r in waiting} & self._quarantined:
            # Committed as (or, on another replica, just before) it was caught: redone too.
            self.counters["redone"] += self.store.redo_results(vehicle_id)
        for request in waiting:
            key = (batch_id, request.seq, request.vehicle_id)
            with self._lock:
                if key in self._strict_queued or request.vehicle_id in self._quarantined:
                    continue
                self._strict_queued.add(key)
                self._strict[batch_id] = True
            try:
                probe = workload.probe(request.payload, request.result, self.rng.randrange(1 << 30))
            except ValueError:
                continue
            owner = self.profile(request.vehicle_id).owner
            check = _Check(
                id=next(self._ids),
                kind="check",
                model=request.model,
                workload=workload,
                probe=probe,
                purpose=purpose,
                data_region=data_region,
                created_at=now,
                subject=request.vehicle_id,
                subject_class=self.class_of(request.vehicle_id, request.model),
                batch_id=batch_id,
                seq=request.seq,
                committed_at=now,
                strict=True,
                excluded_cars={request.vehicle_id},
                excluded_owners={owner},
            )
            with self._lock:
                self._enqueue(check)
                self._pending[request.vehicle_id] += 1
                self._pending_since.setdefault(request.vehicle_id, now)
        return False

    # -- what the fleet API shows --------------------------------------------------------------
    def events(self) -> dict[str, int]:
        """What verification did since this replica started, by event (``/metrics``)."""
        with self._lock:
            return {k: v for k, v in self.counters.items() if ":" not in k}

    def status(self, vehicle_ids: Sequence[str] | None = None) -> dict[str, Any]:
        records = {t.vehicle_id: t for t in self.store.list_trust()}
        counters = self.events()
        with self._lock:
            records.update(self._trust)
            queued = sum(len(q) for q in self._queue.values())
            in_flight = sum(len(p) for p in self._placed.values())
        if vehicle_ids is not None:
            wanted = set(vehicle_ids)
            records = {k: v for k, v in records.items() if k in wanted}
        work = counters.get("work", 0)
        return {
            "policy": {
                "floor": self.policy.floor,
                "new_car_checks": self.policy.new_car_checks,
                "canary_new": self.policy.canary_new,
                "canary_trusted": self.policy.canary_trusted,
                "distinct_owners": self.distinct_owners,
            },
            "counters": counters,
            "overhead": (counters.get("probe_work", 0) / work) if work else 0.0,
            "queued": queued,
            "in_flight": in_flight,
            "cars": [
                {
                    "vehicle_id": t.vehicle_id,
                    "state": "quarantined"
                    if t.quarantined
                    else ("trusted" if t.trusted(self.policy) else "new"),
                    "streak": t.streak,
                    "agreed": t.agreed,
                    "disagreed": t.disagreed,
                    "check_rate": round(check_rate(t, self.policy), 4),
                    "verified_through": t.verified_through or None,
                    "quarantined_at": t.quarantined_at,
                    "reason": t.reason,
                }
                for t in sorted(records.values(), key=lambda t: t.vehicle_id)
            ],
        }
