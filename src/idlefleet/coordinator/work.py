"""The coordinator's side of the work protocol: what each uplink message does.

Each method takes the vehicle id (from the NATS subject, which per-vehicle permissions will
bind to the car's credentials) and a decoded message, and returns the reply message. No I/O but
the store; the NATS edge (:mod:`idlefleet.coordinator.nats_service`) does the wire, and calls
the batched forms (:meth:`WorkService.lease_for`, :meth:`WorkService.results_many`,
:meth:`WorkService.register_many`) so that one store transaction serves many cars.

What each message costs: a heartbeat touches memory only (:class:`VehicleRegistry`; the
coordinator flushes liveness in batches); registration, leases, result commits and releases are
durable writes; a work request for which there is nothing costs nothing here (the dispatcher
parks it). Every method is safe to call from several threads at once.

Consent gates leasing here: a car whose owner has not opted in gets no lease at all, and an
opted-in car only units whose purpose and data region its owner allows (the store filters),
read fresh from the store in the same round as the lease. The car's policy guard checks again;
the coordinator never relies on it alone.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.liveness import ASKED_FOR_WORK, LiveVehicle, VehicleRegistry
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.owners import OwnerService
from idlefleet.coordinator.planner import UnitPolicy, unit_size
from idlefleet.coordinator.seq_mask import SeqMask
from idlefleet.coordinator.store import (
    CommitOutcome,
    Lease,
    LeaseAsk,
    RequestResult,
    ResultCommit,
    Store,
    VehicleRecord,
)
from idlefleet.coordinator.verification import Verifier
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Heartbeat,
    Progress,
    ProgressAck,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    WireError,
    WorkGrant,
    WorkItem,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import (
    DEFAULT_DATA_REGION,
    DEFAULT_PURPOSE,
    PolicyRequest,
    PolicyUpdate,
)
from idlefleet.workloads import Workload, by_endpoint, for_model

log = logging.getLogger(__name__)

NOT_OPTED_IN_RETRY_S = 5.0
"""How long a car that is not opted in waits before asking for work again."""
QUARANTINED_RETRY_S = 60.0
"""How long a quarantined car waits before asking for work again."""
NO_WORK_RETRY_S = 0.5
"""How long a car that asked without waiting (``wait_s`` 0) waits before asking again."""


class WorkService:
    def __init__(
        self,
        store: Store,
        batches: BatchService,
        units: UnitPolicy | None = None,
        heartbeat_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        owners: OwnerService | None = None,
        registry: VehicleRegistry | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.store = store
        self.batches = batches
        self.units = units or UnitPolicy()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.owners = owners or OwnerService(store, clock)
        self.registry = registry or VehicleRegistry(write_every_s=heartbeat_interval_s)
        self._registry_lock = threading.Lock()
        self._lease_infos = _LeaseInfos()
        self.verifier = verifier
        """Checks cars' results on other cars (None: results are trusted as they come).
        With one, cars see their units' requests under masked numbers (``seq_mask``)."""
        self._seq_mask: SeqMask | None = None
        self.refused_results: Counter[str] = Counter()
        """Result chunks refused as impossible, per car (this replica's count since it started)."""
        self.progress_recorded = 0
        """Requests' progress kept (a car's report on unfinished work)."""
        self.resumed = 0
        """Requests leased with another car's progress (they continue where it stopped)."""
        self.releases_refused: dict[str, int] = {}
        """Model releases each car reports having refused (its heartbeats' running count)."""
        self.model_digests: dict[str, str] = {}
        """The released (signed) version of each model, by manifest digest, that grants name;
        kept up to date by the replica from the models object store (empty: unsigned)."""
        self.live_vehicles = 1
        """Cars seen within the liveness horizon, fleet-wide (refreshed by the coordinator's
        housekeeping from the store; sizes units by guided self-scheduling)."""
        self.metrics: Metrics | None = None
        """Counts work done, hand-backs and the cars' figures (None: not counted)."""

    @property
    def live_horizon_s(self) -> float:
        """A car is live if heard from within three heartbeat intervals."""
        return 3 * self.heartbeat_interval_s

    # -- liveness ------------------------------------------------------------------------------
    def is_registered(self, vehicle_id: str) -> bool:
        """Whether the car registered (with any replica); memory first, then the store."""
        now = self.clock()
        with self._registry_lock:
            if self.registry.get(vehicle_id) is not None:
                return True
            if self.registry.is_unknown(vehicle_id, now):
                return False
        found = self.store.vehicle_liveness([vehicle_id])
        with self._registry_lock:
            if found:
                self.registry.merge(found.values())
                return True
            self.registry.mark_unknown(vehicle_id, now)
            return False

    def look_up_many(self, vehicle_ids: Sequence[str]) -> list[bool]:
        """Which of these cars registered (with any replica): one store read for them all,
        which also brings their liveness and policy versions into this replica's memory."""
        found = self.store.vehicle_liveness(set(vehicle_ids))
        now = self.clock()
        with self._registry_lock:
            self.registry.merge(found.values())
            for vehicle_id in set(vehicle_ids) - found.keys():
                self.registry.mark_unknown(vehicle_id, now)
        if found:
            self.owners.refresh(list(found))
        return [vehicle_id in found for vehicle_id in vehicle_ids]

    def known_state(self, vehicle_id: str) -> bool | None:
        """Registered (True), known not to be (False), or unknown without a store read (None)."""
        with self._registry_lock:
            if self.registry.get(vehicle_id) is not None:
                return True
            return False if self.registry.is_unknown(vehicle_id, self.clock()) else None

    def saw(self, vehicle_id: str, status: str | None = None, reason: str | None = None) -> None:
        self.saw_many([(vehicle_id, status, reason)])

    def saw_many(self, sightings: Sequence[tuple[str, str | None, str | None]]) -> None:
        """Record (car, status, reason) sightings under one taking of the registry's lock."""
        now = self.clock()
        with self._registry_lock:
            for vehicle_id, status, reason in sightings:
                self.registry.seen(vehicle_id, now, status, reason)

    def flush_liveness(self) -> int:
        """Write the liveness that changed since the last flush (one transaction)."""
        with self._registry_lock:
            rows = self.registry.take_unwritten()
        if not rows:
            return 0
        try:
            self.store.record_liveness(rows)
        except Exception:
            with self._registry_lock:
                self.registry.unwrite(rows)
            raise
        return len(rows)

    def refresh_liveness(self) -> int:
        """Count the cars seen lately by any replica (the count sizes units): an index range
        count, so it costs little with a million cars. Cars other replicas heard from are
        learnt one by one, when they first message this replica."""
        live = self.store.count_live_vehicles(self.clock() - self.live_horizon_s)
        self.live_vehicles = max(1, live)
        return live

    def latest(self, record: VehicleRecord) -> VehicleRecord:
        """``record`` with this replica's newer liveness, if it has any."""
        with self._registry_lock:
            car = self.registry.get(record.id)
            if car is None or car.last_seen < record.last_seen:
                return record
            return dataclasses.replace(
                record, last_seen=car.last_seen, status=car.status, status_reason=car.status_reason
            )

    def live_cars(self, since: float) -> list[LiveVehicle]:
        """Copies of the cars this replica heard from since ``since`` (the dashboard's)."""
        with self._registry_lock:
            return [dataclasses.replace(c) for c in self.registry.live(since)]

    def known_cars(self, vehicle_ids: Iterable[str]) -> list[LiveVehicle]:
        """Copies of those of these cars this replica knows."""
        with self._registry_lock:
            found = [self.registry.get(v) for v in vehicle_ids]
            return [dataclasses.replace(c) for c in found if c is not None]

    def online(self, model: str) -> list[str]:
        """Live cars serving ``model`` that are not paused (candidates for online requests).

        The cars this replica heard from within the liveness horizon: with replicas in one
        queue group each gets a share of every car's heartbeats, so each knows most live cars;
        an online request needs only a few of them."""
        since = self.clock() - self.live_horizon_s
        with self._registry_lock:
            live = self.registry.live(since)
        return sorted(c.id for c in live if model in c.models and c.status != "paused")

    # -- registration --------------------------------------------------------------------------
    def register(self, vehicle_id: str, msg: RegisterRequest) -> RegisterReply:
        return self.register_many([(vehicle_id, msg)])[0]

    def register_many(self, asks: Sequence[tuple[str, RegisterRequest]]) -> list[RegisterReply]:
        """Register cars in one durable write; each reply carries the car's policy version."""
        now = self.clock()
        replies: list[RegisterReply | None] = []
        records: list[VehicleRecord] = []
        for vehicle_id, msg in asks:
            if msg.protocol_version != PROTOCOL_VERSION:
                replies.append(
                    RegisterReply(
                        accepted=False,
                        error=WireError(
                            code="protocol_version",
                            message=f"coordinator speaks protocol {PROTOCOL_VERSION}, "
                            f"agent sent {msg.protocol_version}",
                        ),
                    )
                )
                continue
            replies.append(None)
            records.append(
                VehicleRecord(
                    id=vehicle_id,
                    hardware=msg.hardware.model_dump(),
                    models=tuple(msg.models),
                    registered_at=now,
                    last_seen=now,
                    status="idle",
                )
            )
        # The store keeps the first registration time: re-registering only updates the rest.
        self.store.upsert_vehicles(records)
        if self.verifier is not None:
            for record in records:
                self.verifier.registered(record.id, record.hardware)
        with self._registry_lock:
            for record in records:
                self.registry.registered(record)
        versions = self.owners.versions([r.id for r in records])
        done = iter(records)
        return [
            reply
            or RegisterReply(
                accepted=True,
                heartbeat_interval_s=self.heartbeat_interval_s,
                policy_version=versions[next(done).id],
            )
            for reply in replies
        ]

    # -- heartbeats and policy -----------------------------------------------------------------
    def heartbeat_cached(self, vehicle_id: str, msg: Heartbeat) -> Ack | None:
        """The heartbeat's answer from memory alone, or None if it needs a store read."""
        now = self.clock()
        if msg.releases_refused or vehicle_id in self.releases_refused:  # (a restart: 0)
            self.releases_refused[vehicle_id] = msg.releases_refused
        with self._registry_lock:
            if not self.registry.seen(vehicle_id, now, msg.status, msg.reason):
                if self.registry.is_unknown(vehicle_id, now):
                    return Ack(ok=False, error=_not_registered(vehicle_id))
                return None
        version = self.owners.cached_version(vehicle_id)
        if version is None:
            return None
        self._heard(vehicle_id, msg)  # answered here: taken here (None: on the caller's path)
        # The car compares this with the version it enforces and fetches a newer one: the
        # catch-up path when a push (on a policy change) did not reach it.
        return Ack(policy_version=version)

    def heartbeat(self, vehicle_id: str, msg: Heartbeat) -> Ack:
        cached = self.heartbeat_cached(vehicle_id, msg)
        if cached is not None:
            return cached
        if not self.is_registered(vehicle_id):
            return Ack(ok=False, error=_not_registered(vehicle_id))
        self.saw(vehicle_id, msg.status, msg.reason)
        self._heard(vehicle_id, msg)
        return Ack(policy_version=self.owners.current_version(vehicle_id))

    def _heard(self, vehicle_id: str, msg: Heartbeat) -> None:
        """A known car's heartbeat was answered: keep where it is, count what it did. Once:
        :meth:`heartbeat_cached` calls it only when it answers, the slow path after it."""
        if msg.location is not None:
            with self._registry_lock:
                car = self.registry.get(vehicle_id)
                if car is not None:
                    car.location = msg.location
        if msg.figures is not None and self.metrics is not None:
            self.metrics.car_figures(msg.figures)

    def policy(self, vehicle_id: str, msg: PolicyRequest) -> PolicyUpdate:
        """The owner's current policy for the car (version 0, opted out, if none was set)."""
        return self.owners.current(vehicle_id).update()

    # -- work ----------------------------------------------------------------------------------
    def work(self, vehicle_id: str, msg: WorkRequest) -> WorkGrant:
        """Answer one work request at once (no long poll): a unit, or when to ask again."""
        if not self.is_registered(vehicle_id):
            return WorkGrant(error=_not_registered(vehicle_id))
        (grant,) = self.lease_for([(vehicle_id, msg)])
        return grant or WorkGrant(retry_after_s=NO_WORK_RETRY_S)

    def lease_for(self, asks: Sequence[tuple[str, WorkRequest]]) -> list[WorkGrant | None]:
        """One dispatch round: a unit for each registered car that may have one, in order.

        Each answer is a grant with a lease, a grant with an error (``not_opted_in``, or
        ``internal`` for an ask the store failed on), or None: nothing for this car now. The
        owners' policies are read fresh from the store first (one query for the round), so a
        withdrawn consent is honoured at once whatever any cache says. One store transaction
        leases the whole round.
        """
        _, _, grants = self.turn([], asks)
        return grants

    def turn(
        self,
        chunks: Sequence[tuple[str, ResultChunk]],
        asks: Sequence[tuple[str, WorkRequest]],
    ) -> tuple[list[ResultAck], set[str], list[WorkGrant | None]]:
        """The coordinator's turn on the store: commit the result chunks that came in, then
        lease units to the cars waiting for work, in ONE transaction (one fsync).

        Returns an ack per chunk, the batches whose work may have ended (for finalisation,
        off this path), and an answer per ask (see :meth:`lease_for`).
        """
        acks, checked = self._check_all(chunks)
        if self.verifier is not None and checked:
            # A probe answered in this very turn may have quarantined a car whose chunk was
            # checked before: it is not committed (its results are being redone).
            for entry in [c for c in checked if self.verifier.is_quarantined(c[1])]:
                checked.remove(entry)
                acks[entry[0]] = ResultAck(error=_quarantined(entry[1]))
        if self.verifier is not None and asks:
            self.verifier.asking(vehicle_id for vehicle_id, _ in asks)
        consents: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        answers, store_asks, placed = self._asks(asks, consents) if asks else ([], [], [])
        now = self.clock()
        # A new car on probation (its checks are behind) gets no unit until they catch up,
        # only probes of others' work: it cannot run far ahead of what was verified of it.
        held = (
            {j for j, ask in enumerate(store_asks) if self.verifier.on_probation(ask.vehicle_id)}
            if self.verifier is not None
            else set()
        )
        outcomes, leased = self.store.commit_and_lease(
            [commit for *_, commit in checked],
            [ask for j, ask in enumerate(store_asks) if j not in held] if held else store_asks,
            now,
            self.units.lease_seconds,
        )
        if held:
            got = iter(leased)
            leased = [None if j in held else next(got) for j in range(len(store_asks))]
        leases: list[Lease | Exception | None] = list(leased)
        # A batch that leased a unit in this turn has work outstanding: no finalisation check.
        ended = self._acknowledge(acks, checked, outcomes, now) - {
            lease.batch_id for lease in leases if isinstance(lease, Lease)
        }
        for j, (i, lease) in enumerate(zip(placed, leases, strict=True)):
            answers[i] = self._grant(lease)
            if isinstance(lease, Lease) and self.verifier is not None:
                self._add_probes(lease, answers[i], consents.get(lease.vehicle_id))
            elif lease is None and self.verifier is not None:
                answers[i] = self._probes_alone(store_asks[j], now)
        self._lease_infos.put_many(
            (lease.id, _remember(lease)) for lease in leases if isinstance(lease, Lease)
        )
        if self.verifier is not None:
            self._sample(checked, outcomes)
        return [ack or ResultAck() for ack in acks], ended, answers

    def _asks(
        self,
        asks: Sequence[tuple[str, WorkRequest]],
        consents: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
    ) -> tuple[list[WorkGrant | None], list[LeaseAsk], list[int]]:
        """What to ask the store for: a ``LeaseAsk`` per car that may have work, and the
        answers already known (not opted in, quarantined). Fills ``consents`` with the
        purposes and data regions each asking car's owner allows."""
        policies = self.owners.refresh([vehicle_id for vehicle_id, _ in asks])
        answers: list[WorkGrant | None] = [None] * len(asks)
        # Lease ids: 16 random bytes each, from ONE system call for the whole round (a call
        # per ask gave up the GIL per ask; on a busy event loop each took ~1 ms to win back).
        entropy = os.urandom(16 * len(asks)).hex()
        store_asks: list[LeaseAsk] = []
        placed: list[int] = []
        sightings: list[tuple[str, str | None, str | None]] = []
        for i, (vehicle_id, msg) in enumerate(asks):
            owner = policies[vehicle_id].policy
            if self.verifier is not None and self.verifier.is_quarantined(vehicle_id):
                sightings.append((vehicle_id, "paused", "quarantined"))
                answers[i] = WorkGrant(
                    error=_quarantined(vehicle_id), retry_after_s=QUARANTINED_RETRY_S
                )
                continue
            if not owner.opted_in:
                sightings.append((vehicle_id, "paused", "not_opted_in"))
                answers[i] = WorkGrant(
                    error=WireError(
                        code="not_opted_in",
                        message=f"the owner of {vehicle_id} has not opted in to computing; "
                        "no work is leased until they do",
                    ),
                    retry_after_s=NOT_OPTED_IN_RETRY_S,
                )
                continue
            sightings.append((vehicle_id, ASKED_FOR_WORK, None))
            consents[vehicle_id] = (tuple(owner.purposes), tuple(owner.data_regions))
            models = tuple(m for m in msg.models if for_model(m) is not None)
            if not models:
                continue
            sizer = functools.partial(
                unit_size,
                active_vehicles=self.live_vehicles,
                vehicle_max=msg.max_requests,
                policy=self.units,
                vehicle_min=min(msg.min_requests, msg.max_requests),
            )
            store_asks.append(
                LeaseAsk(
                    vehicle_id,
                    f"lease_{entropy[32 * i : 32 * i + 32]}",
                    models,
                    tuple(owner.purposes),
                    tuple(owner.data_regions),
                    sizer,
                    self.units.max_bytes,
                )
            )
            placed.append(i)
        self.saw_many(sightings)
        return answers, store_asks, placed

    @property
    def seq_mask(self) -> SeqMask | None:
        """The mask of request numbers (None without verification: cars see real numbers)."""
        if self.verifier is None:
            return None
        if self._seq_mask is None:
            self._seq_mask = SeqMask(self.store.shared_secret("seq_mask"))
        return self._seq_mask

    def _unmask(self, lease_id: str, seqs: Sequence[int]) -> list[int] | None:
        """The real numbers of a car's (masked) request numbers; None if one cannot be."""
        mask = self.seq_mask
        if mask is None or not seqs:
            return list(seqs)
        real = mask.real(lease_id, list(seqs))
        return None if None in real else [s for s in real if s is not None]

    def _grant(self, outcome: Lease | Exception | None) -> WorkGrant | None:
        if outcome is None:
            return None
        if isinstance(outcome, Exception):
            log.error("leasing failed: %r", outcome)
            return WorkGrant(
                error=WireError(code="internal", message="the coordinator failed; retry")
            )
        # Built from the store's own rows, which were validated when the batch was: no second
        # validation of every payload on the hot path (it was ~40 µs a grant).
        workload = by_endpoint(outcome.endpoint)
        self.resumed += sum(1 for i in outcome.items if i.progress is not None)
        real = [i.seq for i in outcome.items]
        mask = self.seq_mask
        shown = mask.wire(outcome.id, real) if mask is not None else real
        return WorkGrant.model_construct(
            lease_id=outcome.id,
            batch_id=outcome.batch_id,
            kind=workload.kind if workload is not None else None,
            model=outcome.model,
            purpose=outcome.purpose,
            data_region=outcome.data_region,
            lease_seconds=self.units.lease_seconds,
            model_digest=self.model_digests.get(outcome.model),
            items=[
                WorkItem.model_construct(
                    seq=seq,
                    payload=i.payload,
                    progress_b64=None if i.progress is None else pack(i.progress),
                )
                for seq, i in zip(shown, outcome.items, strict=True)
            ],
        )

    # -- verification --------------------------------------------------------------------------
    def _add_probes(
        self,
        lease: Lease,
        grant: WorkGrant | None,
        consent: tuple[tuple[str, ...], tuple[str, ...]] | None,
    ) -> None:
        """Slip probes of other cars' results (and canaries) into a grant, where they look
        like the unit's other requests."""
        assert self.verifier is not None
        if grant is None or consent is None:
            return
        probes = self.verifier.place(
            lease.vehicle_id,
            lease.id,
            lease.model,
            [item.seq for item in grant.items],
            consent[0],
            consent[1],
            lease.deadline + self.units.lease_seconds,
        )
        for seq, payload in probes:
            at = self.verifier.rng.randrange(len(grant.items) + 1)
            grant.items.insert(
                at, WorkItem.model_construct(seq=seq, payload=payload, progress_b64=None)
            )

    def _probes_alone(self, ask: LeaseAsk, now: float) -> WorkGrant | None:
        """A unit of probes for a car that found no work (the checks of a batch's last
        results, which a strict batch waits for)."""
        assert self.verifier is not None
        found = self.verifier.place_alone(
            ask.vehicle_id,
            ask.lease_id,
            ask.models,
            ask.purposes,
            ask.data_regions,
            now + 2 * self.units.lease_seconds,
        )
        if found is None:
            return None
        model, probes, purpose, data_region = found
        workload = for_model(model)
        return WorkGrant.model_construct(
            lease_id=ask.lease_id,
            batch_id=f"verify_{ask.lease_id.removeprefix('lease_')[:24]}",
            kind=workload.kind if workload is not None else None,
            model=model,
            purpose=purpose,
            data_region=data_region,
            lease_seconds=self.units.lease_seconds,
            model_digest=self.model_digests.get(model),
            items=[
                WorkItem.model_construct(seq=seq, payload=payload, progress_b64=None)
                for seq, payload in probes
            ],
        )

    def _sample(
        self, checked: Sequence[_Checked], outcomes: Sequence[CommitOutcome | Exception]
    ) -> None:
        """Queue probes of the results just committed."""
        assert self.verifier is not None
        for (_, vehicle_id, _, lease, commit), outcome in zip(checked, outcomes, strict=True):
            if not isinstance(outcome, CommitOutcome) or outcome.committed == 0:
                continue
            payloads = lease.payloads or {}
            try:
                self.verifier.sample(
                    vehicle_id,
                    lease.batch_id,
                    lease.model,
                    lease.workload,
                    lease.purpose,
                    lease.data_region,
                    [(r.seq, payloads.get(r.seq), r.result) for r in commit.results],
                )
            except Exception:  # verification must never cost a car its commit
                log.exception("sampling results of %s for verification failed", vehicle_id)

    # -- results -------------------------------------------------------------------------------
    def results(self, vehicle_id: str, msg: ResultChunk) -> ResultAck:
        (ack,), ended = self.results_many([(vehicle_id, msg)])
        for batch_id in ended:
            self.batches.maybe_finalize(batch_id)
        return ack

    def results_many(
        self, chunks: Sequence[tuple[str, ResultChunk]]
    ) -> tuple[list[ResultAck], set[str]]:
        """Check and commit result chunks in one transaction.

        The results' bytes are what is stored; the response bodies are rendered when the batch
        is finalised, a thousand at a time (rendering embeddings here cost a commit ~0.3 ms of
        CPU per chunk of 4 and stored six times the bytes: floats as JSON text beside vectors).

        Returns an ack per chunk and the batches whose work may have ended (a unit finished or
        a late answer came in): the caller checks those for finalisation, off this path.
        """
        acks, ended, _ = self.turn(chunks, [])
        return acks, ended

    def _check_all(
        self, chunks: Sequence[tuple[str, ResultChunk]]
    ) -> tuple[list[ResultAck | None], list[_Checked]]:
        acks: list[ResultAck | None] = [None] * len(chunks)
        checked: list[_Checked] = []
        remembered = self._lease_infos.get_many([msg.lease_id for _, msg in chunks])
        for i, (vehicle_id, msg) in enumerate(chunks):
            prepared = self._check(vehicle_id, msg, remembered[i])
            if isinstance(prepared, ResultAck):
                acks[i] = prepared
            else:
                checked.append((i, vehicle_id, *prepared))
        return acks, checked

    def _acknowledge(
        self,
        acks: list[ResultAck | None],
        checked: list[_Checked],
        outcomes: Sequence[CommitOutcome | Exception],
        now: float,
    ) -> set[str]:
        """Fill in the acks of committed chunks; the batches whose work may have ended."""
        ended: set[str] = set()
        over: list[str] = []
        for (i, vehicle_id, msg, lease, commit), outcome in zip(checked, outcomes, strict=True):
            acks[i] = self._ack(vehicle_id, msg, outcome, now)
            if isinstance(outcome, CommitOutcome) and outcome.committed:
                self._count(lease.workload, commit.results, outcome.committed)
            if isinstance(outcome, CommitOutcome) and (
                outcome.lease_finished or not outcome.lease_active
            ):
                over.append(msg.lease_id)
                # A batch can only run out of work when a unit ends (or a late answer
                # arrives); the sweeper checks every batch each second as well.
                ended.add(lease.batch_id)
        self._lease_infos.pop_many(over)
        return ended

    def _count(self, workload: Workload, results: Sequence[RequestResult], committed: int) -> None:
        """Metrics of a commit: requests done and their tokens (scaled to what was new when a
        chunk repeated results another car had committed first)."""
        if self.metrics is None or not results:
            return
        tokens_in = tokens_out = 0
        for r in results:
            used = workload.usage(r.result, r.token_count)
            tokens_in += used[0]
            tokens_out += used[1]
        share = committed / len(results)
        tokens_in, tokens_out = round(tokens_in * share), round(tokens_out * share)
        self.metrics.finished(workload.kind, "batch", committed, 0, tokens_in, tokens_out)

    def _check(
        self, vehicle_id: str, msg: ResultChunk, remembered: _LeaseInfo | None
    ) -> tuple[ResultChunk, _LeaseInfo, ResultCommit] | ResultAck:
        """Check a chunk against its lease (``remembered``: what this replica knows of it, if
        anything): what to commit (the chunk without its answers to probes), or why it is
        refused."""
        if self.verifier is not None and self.verifier.is_alone(msg.lease_id):
            return self._answer_alone(vehicle_id, msg)
        lease = self._lease_info(vehicle_id, msg.lease_id, remembered)
        if lease is None:
            return ResultAck(error=_unknown_lease(msg.lease_id))
        if self.verifier is not None and self.verifier.is_quarantined(vehicle_id):
            return ResultAck(error=_quarantined(vehicle_id))
        try:
            data = msg.data()
        except ValueError:  # the right length, but not base64: refused alone, not the turn
            return self._bad_results(vehicle_id, "data_b64 is not valid base64")
        probes = self.verifier.probe_seqs(msg.lease_id) if self.verifier is not None else None
        if probes and not probes.keys().isdisjoint([*msg.seqs, *msg.failed_seqs]):
            msg, data = self._answer_probes(vehicle_id, lease, msg, data, probes)
        if self.verifier is not None:
            seqs = self._unmask(msg.lease_id, msg.seqs)
            failed = self._unmask(msg.lease_id, msg.failed_seqs)
            if seqs is None or failed is None:
                return self._bad_results(vehicle_id, "a request number is not one of the lease's")
            msg = msg.model_copy(update={"seqs": seqs, "failed_seqs": failed})
        expected = self._expected(lease, msg.seqs)
        problem = lease.workload.check(
            lease.model,
            msg.seqs,
            [expected.get(seq) for seq in msg.seqs],
            msg.sizes,
            msg.token_counts,
            data,
        )
        if problem:
            return self._bad_results(vehicle_id, problem)
        results = []
        start = 0
        for seq, size, tokens in zip(msg.seqs, msg.sizes, msg.token_counts, strict=True):
            results.append(RequestResult(seq, data[start : start + size], tokens))
            start += size
        return msg, lease, ResultCommit(vehicle_id, msg.lease_id, tuple(results), msg.energy_j)

    def _answer_alone(self, vehicle_id: str, msg: ResultChunk) -> ResultAck:
        """Answers to a unit of probes alone: all for the verifier, nothing to commit."""
        assert self.verifier is not None
        probes = self.verifier.probe_seqs(msg.lease_id) or {}
        try:
            data = msg.data()
        except ValueError:
            return self._bad_results(vehicle_id, "data_b64 is not valid base64")
        model = self.verifier.lease_model(msg.lease_id)
        workload = for_model(model) if model else None
        if workload is None or not set(msg.seqs) <= probes.keys():
            return ResultAck(error=_unknown_lease(msg.lease_id))
        start = 0
        for seq, size, tokens in zip(msg.seqs, msg.sizes, msg.token_counts, strict=True):
            part = data[start : start + size]
            start += size
            problem = workload.check(
                model or "", [seq], [workload.expectation(probes[seq])], [size], [tokens], part
            )
            self.verifier.answer(vehicle_id, msg.lease_id, seq, None if problem else part)
        if msg.failed_seqs:
            self.verifier.unanswered(msg.lease_id, msg.failed_seqs)
        left = self.verifier.probe_seqs(msg.lease_id)
        return ResultAck(
            committed=0,  # taken by the verifier: nothing of a batch was committed
            lease_active=bool(left),
            lease_seconds=self.units.lease_seconds if left else 0.0,
        )

    def _answer_probes(
        self,
        vehicle_id: str,
        lease: _LeaseInfo,
        msg: ResultChunk,
        data: bytes,
        probes: Mapping[int, Any],
    ) -> tuple[ResultChunk, bytes]:
        """Take a chunk's answers to probes out of it, for the verifier: the rest of the chunk
        (the unit's own requests) goes on to its commit."""
        assert self.verifier is not None
        keep_seqs: list[int] = []
        keep_sizes: list[int] = []
        keep_tokens: list[int] = []
        kept: list[bytes] = []
        start = 0
        for seq, size, tokens in zip(msg.seqs, msg.sizes, msg.token_counts, strict=True):
            part = data[start : start + size]
            start += size
            if seq not in probes:
                keep_seqs.append(seq)
                keep_sizes.append(size)
                keep_tokens.append(tokens)
                kept.append(part)
                continue
            problem = lease.workload.check(
                lease.model,
                [seq],
                [lease.workload.expectation(probes[seq])],
                [size],
                [tokens],
                part,
            )
            self.verifier.answer(vehicle_id, msg.lease_id, seq, None if problem else part)
        rest = b"".join(kept)
        failed = [seq for seq in msg.failed_seqs if seq not in probes]
        if len(failed) != len(msg.failed_seqs):
            self.verifier.unanswered(msg.lease_id, [s for s in msg.failed_seqs if s in probes])
        return (
            ResultChunk.model_construct(
                lease_id=msg.lease_id,
                seqs=keep_seqs,
                token_counts=keep_tokens,
                sizes=keep_sizes,
                data_b64=pack(rest),
                failed_seqs=failed,
                energy_j=msg.energy_j,
            ),
            rest,
        )

    def _expected(self, lease: _LeaseInfo, seqs: Sequence[int]) -> Mapping[int, Any]:
        """What checking needs of these requests: remembered from the grant, or (granted by
        another replica) worked out from their payloads in the store."""
        if lease.expected is not None:
            return lease.expected
        payloads = self.store.request_payloads(lease.batch_id, seqs)
        return {seq: lease.workload.expectation(p) for seq, p in payloads.items()}

    def _bad_results(self, vehicle_id: str, problem: str) -> ResultAck:
        """Refuse a chunk whose results cannot be right, and count it against the car."""
        self.refused_results[vehicle_id] += 1
        log.warning("refused results of %s: %s", vehicle_id, problem)
        return ResultAck(error=WireError(code="bad_results", message=problem))

    def _lease_info(
        self, vehicle_id: str, lease_id: str, info: _LeaseInfo | None
    ) -> _LeaseInfo | None:
        """The batch, workload and model of a lease of ``vehicle_id``: remembered from the
        grant when this replica made it (``info``), else read from the store."""
        if info is not None and info.vehicle_id == vehicle_id:
            return info
        lease = self.store.get_lease(vehicle_id, lease_id)
        if lease is None:
            return None
        workload = by_endpoint(lease.endpoint)
        if workload is None:
            return None
        return _LeaseInfo(
            vehicle_id,
            lease.batch_id,
            lease.model,
            workload,
            None,
            None,
            lease.purpose,
            lease.data_region,
        )

    def _ack(
        self, vehicle_id: str, msg: ResultChunk, outcome: CommitOutcome | Exception, now: float
    ) -> ResultAck:
        if isinstance(outcome, Exception):
            log.error("committing results of %s failed: %r", msg.lease_id, outcome)
            return ResultAck(
                error=WireError(code="internal", message="the coordinator failed; retry")
            )
        if outcome.unknown_lease:
            return ResultAck(error=_unknown_lease(msg.lease_id))
        if msg.failed_seqs:
            self.store.return_requests(vehicle_id, msg.lease_id, msg.failed_seqs)
        return ResultAck(
            committed=outcome.committed,
            duplicates=outcome.duplicates,
            lease_active=outcome.lease_active,
            lease_seconds=(outcome.deadline - now) if outcome.deadline else 0.0,
        )

    # -- progress ------------------------------------------------------------------------------
    def progress(self, vehicle_id: str, msg: Progress) -> ProgressAck:
        """Keep a car's progress on its lease's requests (checked by their workload first) and
        extend the lease; a request leased again later carries the newest progress."""
        (remembered,) = self._lease_infos.get_many([msg.lease_id])
        lease = self._lease_info(vehicle_id, msg.lease_id, remembered)
        if lease is None:
            return ProgressAck(error=_unknown_lease(msg.lease_id))
        try:
            data = msg.data()
        except ValueError:
            return self._bad_progress(vehicle_id, "data_b64 is not valid base64")
        probes = self.verifier.probe_seqs(msg.lease_id) if self.verifier is not None else None
        if probes and not probes.keys().isdisjoint(msg.seqs):
            # A probe's progress is of no use (another car never continues it): dropped.
            kept = [
                (seq, size, start)
                for seq, size, start in zip(
                    msg.seqs, msg.sizes, itertools.accumulate(msg.sizes, initial=0), strict=False
                )
                if seq not in probes
            ]
            data = b"".join(data[start : start + size] for _, size, start in kept)
            msg = Progress.model_construct(
                lease_id=msg.lease_id,
                seqs=[seq for seq, _, _ in kept],
                sizes=[size for _, size, _ in kept],
                data_b64=pack(data),
            )
        if self.verifier is not None:
            seqs = self._unmask(msg.lease_id, msg.seqs)
            if seqs is None:
                return self._bad_progress(vehicle_id, "a request number is not one of the lease's")
            msg = msg.model_copy(update={"seqs": seqs})
        expected = self._expected(lease, msg.seqs)
        problem = lease.workload.check_progress(
            lease.model, msg.seqs, [expected.get(seq) for seq in msg.seqs], msg.sizes, data
        )
        if problem:
            return self._bad_progress(vehicle_id, problem)
        items = []
        start = 0
        for seq, size in zip(msg.seqs, msg.sizes, strict=True):
            items.append((seq, data[start : start + size]))
            start += size
        now = self.clock()
        outcome = self.store.record_progress(
            vehicle_id, msg.lease_id, items, now, self.units.lease_seconds
        )
        if outcome.unknown_lease:
            return ProgressAck(error=_unknown_lease(msg.lease_id))
        self.progress_recorded += outcome.committed
        return ProgressAck(
            recorded=outcome.committed,
            lease_active=outcome.lease_active,
            lease_seconds=(outcome.deadline - now) if outcome.deadline else 0.0,
        )

    def _bad_progress(self, vehicle_id: str, problem: str) -> ProgressAck:
        self.refused_results[vehicle_id] += 1
        log.warning("refused progress of %s: %s", vehicle_id, problem)
        return ProgressAck(error=WireError(code="bad_progress", message=problem))

    # -- release -------------------------------------------------------------------------------
    def release(self, vehicle_id: str, msg: Release) -> ReleaseAck:
        if self.verifier is not None and self.verifier.is_alone(msg.lease_id):
            given_back = len(self.verifier.probe_seqs(msg.lease_id) or {})
            self.verifier.unanswered(msg.lease_id)
            return ReleaseAck(released=given_back)
        released = self.store.release_lease(
            vehicle_id, msg.lease_id, self.clock(), msg.reason, msg.energy_j
        )
        if released is None:
            return ReleaseAck(error=_unknown_lease(msg.lease_id))
        self._lease_infos.pop_many([msg.lease_id])
        if self.metrics is not None:
            self.metrics.handed_back(msg.reason)
        if self.verifier is not None:
            self.verifier.unanswered(msg.lease_id)
        lease = self.store.get_lease(vehicle_id, msg.lease_id)
        if lease is not None:
            self.batches.maybe_finalize(lease.batch_id)
        return ReleaseAck(released=released)


@dataclass(frozen=True)
class _LeaseInfo:
    """What checking results needs of a lease; fixed once the lease is made."""

    vehicle_id: str
    batch_id: str
    model: str
    workload: Workload
    expected: Mapping[int, Any] | None
    """What checking a result needs of each request of the unit (``Workload.expectation`` of
    its payload), by seq; None: not known here (ask the store)."""
    payloads: Mapping[int, Any] | None = None
    """The requests' payloads by seq, as granted (verification probes them); None: not known
    here."""
    purpose: str = DEFAULT_PURPOSE
    data_region: str = DEFAULT_DATA_REGION


def _remember(lease: Lease) -> _LeaseInfo:
    workload = by_endpoint(lease.endpoint)
    assert workload is not None, f"lease {lease.id} of an endpoint no workload serves"
    return _LeaseInfo(
        lease.vehicle_id,
        lease.batch_id,
        lease.model,
        workload,
        {item.seq: workload.expectation(item.payload) for item in lease.items},
        {item.seq: item.payload for item in lease.items},
        lease.purpose,
        lease.data_region,
    )


_Checked = tuple[int, str, ResultChunk, _LeaseInfo, ResultCommit]
"""A chunk that passed its checks: (index in the call, vehicle, chunk, its lease, to commit)."""


class _LeaseInfos:
    """The leases this replica granted lately (bounded, oldest forgotten first; thread-safe)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._infos: OrderedDict[str, _LeaseInfo] = OrderedDict()
        self._lock = threading.Lock()

    def put_many(self, infos: Iterable[tuple[str, _LeaseInfo]]) -> None:
        with self._lock:
            for lease_id, info in infos:
                self._infos[lease_id] = info
            while len(self._infos) > self._limit:
                self._infos.popitem(last=False)

    def pop_many(self, lease_ids: Iterable[str]) -> None:
        with self._lock:
            for lease_id in lease_ids:
                self._infos.pop(lease_id, None)

    def get_many(self, lease_ids: Sequence[str]) -> list[_LeaseInfo | None]:
        with self._lock:
            return [self._infos.get(lease_id) for lease_id in lease_ids]


def _not_registered(vehicle_id: str) -> WireError:
    return WireError(code="not_registered", message=f"vehicle {vehicle_id} must register first")


def _quarantined(vehicle_id: str) -> WireError:
    return WireError(
        code="quarantined",
        message=f"vehicle {vehicle_id} is quarantined: results of its work disagreed with "
        "other owners' cars; an operator can reinstate it",
    )


def _unknown_lease(lease_id: str) -> WireError:
    return WireError(code="unknown_lease", message=f"lease {lease_id} is not held by this vehicle")
