"""The store interface and its records, with the guarantees every backend MUST give.

Guarantees (checked by the contract suite in ``tests/coordinator/store/``):

* Every method is atomic: it either takes full effect or none (a crash in between leaves the
  state of before the call).
* Everything a method has returned from survives a process restart.
* A request is in at most one *active* lease at a time; :meth:`Store.lease_unit` never hands out
  a request that is finished or actively leased, and concurrent callers (threads or coordinator
  replicas) never receive the same request.
* :meth:`Store.commit_results` is idempotent per (batch, request): the first result committed
  wins, later ones are counted as duplicates and change nothing. A result from a vehicle whose
  lease expired or was reissued is still accepted if the request is not yet finished, so a late
  answer loses nothing and duplicates nothing. A vehicle can commit only requests it was leased.
* An expired or released lease returns its unfinished requests to the queue.
* :meth:`Store.update_batch` is a compare-and-set on the batch status, so that exactly one
  replica performs each status transition.
* :meth:`Store.lease_unit` leases only requests of batches whose purpose and data region the
  caller allows (the owner's consent); nothing else about the order changes.
* Owner policies are append-only: :meth:`Store.append_policy` adds version ``n + 1`` and never
  changes or removes an earlier version, and concurrent appends for one vehicle get distinct,
  consecutive versions. The history is the consent record (who, when, what).
* The batch operations (:meth:`Store.lease_units`, :meth:`Store.commit_many`) are one
  transaction for the whole batch, and take effect as if their items had been called one after
  the other in order. An item refused for its own sake (its ``unit_size`` raised, its energy is
  not a finite number >= 0) gets the exception in its place in the answer and changes nothing;
  the others go ahead. A failure of the database itself fails the whole call, which then
  changes nothing. They exist so that a coordinator pays one durable commit (one fsync) for
  many cars' leases or results.
* Every hot path costs O(size of the unit), never O(size of the batch or of the fleet):
  leasing, committing and reading a batch's request counts.
* A batch *claim* (:meth:`Store.claim_batch`) is a compare-and-set with a deadline, so that a
  singleton duty on a batch (validation, finalisation, cancellation, expiry) is done by one
  replica at a time, and taken over by another when the holder dies. :meth:`Store.finish_batch`
  ends a batch only for the claim's holder, and leaves exactly one set of output files.
* Liveness (heartbeats) reaches the store in batches (:meth:`Store.record_liveness`), newest
  wins: a late flush of an older heartbeat never overwrites a newer one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from idlefleet.coordinator.trust import CarTrust
from idlefleet.protocol.policy import DEFAULT_DATA_REGION, DEFAULT_PURPOSE

if TYPE_CHECKING:
    from idlefleet.coordinator.ledger import Entry
    from idlefleet.coordinator.store.verification_sql import DoneRequest, VerdictRow

RequestState = Literal["pending", "leased", "done", "failed"]


class StoreUnavailable(RuntimeError):
    """The database could not be reached (a server restarting, a lost connection).

    Nothing of the failed call took effect; the same call may succeed when retried. Backends
    translate their drivers' connection errors into this, so callers need not know them.
    """


@dataclass(frozen=True)
class FileRecord:
    """Metadata of an uploaded or generated file (OpenAI File object)."""

    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    status: str = "processed"
    batch_id: str | None = None
    """For a batch's output and error files: the batch they belong to (not shown to clients)."""
    principal: str | None = None
    """Who owns it: the principal of the API key that uploaded it (None: made by the
    coordinator itself for a batch, owned through the batch, or made before keys existed)."""


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    pending: int = 0
    leased: int = 0

    @property
    def unfinished(self) -> int:
        return self.pending + self.leased


BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
"""An OpenAI Batch object's status."""
BATCH_STATUSES: tuple[str, ...] = get_args(BatchStatus)


@dataclass(frozen=True)
class FleetCounts:
    """The whole fleet at one instant (every replica's cars and batches), for metrics."""

    batches: dict[str, int]
    """Batches by OpenAI status."""
    pending_requests: int
    """Requests of unfinished batches waiting for a car (the queue's depth)."""
    leased_requests: int
    """Requests of unfinished batches a car holds now."""
    active_leases: int
    live_cars: dict[str, int]
    """Cars heard from since ``live_since``, by the status they last reported."""
    offline_cars: int
    """Registered cars not heard from since then."""


@dataclass(frozen=True)
class BatchRecord:
    """A batch job (OpenAI Batch object) as stored."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    purpose: str = DEFAULT_PURPOSE
    """What the customer uses the results for (one of ``protocol.policy.PURPOSES``)."""
    data_region: str = DEFAULT_DATA_REGION
    """Where the batch's data may be processed (one of ``protocol.policy.DATA_REGIONS``)."""
    principal: str | None = None
    """Who owns it: the principal of the API key that created it (None: before keys)."""
    expected_requests: int | None = None
    """Lines of its input file, counted at creation when the principal has a queue quota:
    what the batch will queue while it is still validating."""
    api_key_id: str | None = None
    """The API key it was created with (its charges are that key's usage)."""


@dataclass(frozen=True)
class NewRequest:
    """A request of a batch as planned at validation.

    Either ``payload`` is set (to run) or ``error_status``/``error_body`` (a request-level error
    found at validation, which goes straight to the error file). ``payload`` and ``options``
    are the workload's (``idlefleet.workloads``); the store keeps them as they are.
    """

    seq: int
    custom_id: str
    model: str = ""
    options: str = ""
    """What rendering the response needs (the workload's; e.g. an encoding format)."""
    payload: Any = None
    """The request's input as a JSON value (sent to cars as ``WorkItem.payload``)."""
    sort_key: int = 0
    """Lease order: largest first (the workload's compute estimate)."""
    error_status: int | None = None
    error_body: dict[str, Any] | None = None


@dataclass(frozen=True)
class LeasedItem:
    seq: int
    custom_id: str
    payload: Any
    progress: bytes | None = None
    """What a car that held the request before reported of its work on it (its workload's
    encoding, e.g. the tokens generated so far): the new car continues from there."""


@dataclass(frozen=True)
class Lease:
    """A unit of work handed to one vehicle until ``deadline``."""

    id: str
    batch_id: str
    vehicle_id: str
    model: str
    deadline: float
    items: tuple[LeasedItem, ...]
    endpoint: str = ""
    """The batch's endpoint (names its workload)."""
    state: str = "active"
    """``active``, or how it ended: ``finished``, ``released``, ``expired``."""
    purpose: str = DEFAULT_PURPOSE
    """The batch's purpose (the unit carries it to the car's policy guard)."""
    data_region: str = DEFAULT_DATA_REGION
    """The batch's data region."""
    energy_j: float = 0.0
    """Energy the vehicle reported for this lease (result chunks plus release), joules."""
    end_reason: str | None = None
    """Why the vehicle released the lease (its ``Release.reason``); None otherwise."""


@dataclass(frozen=True)
class RequestResult:
    """The successful result of one request: bytes in its workload's encoding, and tokens."""

    seq: int
    result: bytes
    token_count: int


@dataclass(frozen=True)
class LeaseAsk:
    """One car's request for a unit, as :meth:`Store.lease_units` takes it."""

    vehicle_id: str
    lease_id: str
    """Id of the lease to create (the caller makes it unique)."""
    models: tuple[str, ...]
    """Models the car can run; the unit carries one of them."""
    purposes: tuple[str, ...]
    """Batch purposes the car's owner allows (empty: nothing)."""
    data_regions: tuple[str, ...]
    """Batch data regions the car's owner allows (empty: nothing)."""
    unit_size: Callable[[int], int]
    """Given the chosen batch's pending count, how many requests to take."""
    max_bytes: int | None = None
    """The unit's payloads (their stored JSON, counted in UTF-8 bytes) total at most this, so
    that its grant fits in one NATS message; the unit's first request goes whatever its size
    (validation keeps each request far below the message limit). None: no bound."""


@dataclass(frozen=True)
class ResultCommit:
    """One result chunk of a car, as :meth:`Store.commit_many` takes it."""

    vehicle_id: str
    lease_id: str
    results: tuple[RequestResult, ...]
    energy_j: float = 0.0
    """What the car spent on the chunk (finite, >= 0)."""


@dataclass(frozen=True)
class CommitOutcome:
    committed: int
    duplicates: int
    lease_active: bool
    deadline: float | None
    unknown_lease: bool = False
    lease_finished: bool = False
    """This commit finished the lease's last open request."""


@dataclass(frozen=True)
class StoredRequest:
    """A request as read back for finalisation."""

    seq: int
    custom_id: str
    state: RequestState
    options: str
    model: str
    result: bytes | None
    token_count: int | None
    error_status: int | None
    error_body: dict[str, Any] | None
    vehicle_id: str | None = None
    """The car whose result it holds (done requests)."""
    finished_at: float | None = None
    """When its result was committed."""


@dataclass(frozen=True)
class VehicleRecord:
    id: str
    hardware: dict[str, Any]
    models: tuple[str, ...]
    registered_at: float
    last_seen: float
    status: str = "idle"
    completed_requests: int = 0
    status_reason: str | None = None
    """Why the vehicle is in ``status`` (the agent's reasons for a pause), from its heartbeat."""


@dataclass(frozen=True)
class VehicleSeen:
    """What one heartbeat (or work request) said about a car; flushed in batches."""

    vehicle_id: str
    last_seen: float
    status: str
    status_reason: str | None = None


@dataclass(frozen=True)
class VehicleLiveness:
    """The part of a vehicle's record that says whether it can take work now (cheap to read)."""

    id: str
    models: tuple[str, ...]
    last_seen: float
    status: str
    status_reason: str | None = None


@dataclass(frozen=True)
class PolicyRecord:
    """One version of an owner's policy for one vehicle, as appended (never changed)."""

    vehicle_id: str
    version: int
    """1, 2, 3, ... per vehicle."""
    policy_json: str
    """The ``OwnerPolicy`` as JSON; the store keeps it verbatim and does not interpret it."""
    actor: str
    """Who set this version, e.g. ``owner:alice``."""
    created_at: float


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: never its secret, only the secret's sha256."""

    id: str
    secret_sha256: str
    role: str
    """``customer``, ``owner`` or ``operator`` (``coordinator.access.Role``)."""
    principal: str
    """Whom the key acts for: a customer account, an owner, an operator. Files and batches
    belong to a principal; an owner principal owns the cars enrolled under its name."""
    name: str
    created_at: float
    revoked_at: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    queued_requests: int | None = None
    """Quotas (a new key gets its role's defaults, ``access.DEFAULT_QUOTAS``); None: none."""


@dataclass(frozen=True)
class Enrolment:
    """A car's identity: the public nkey it connects to NATS with, and its owner."""

    vehicle_id: str
    nkey: str
    """Public user nkey (``U...``); the private seed never leaves the car."""
    owner: str
    enrolled_at: float
    revoked_at: float | None = None
    expires_at: float | None = None
    """When the credentials stop working unless renewed (None: until revoked)."""


class Store(ABC):
    """Persistent coordinator state. See the module docstring for the guarantees."""

    max_attempts: int = 3
    """A request whose attempts failed this many times ends ``failed`` with the code
    ``request_failed`` (``attempts_exhausted_body``) instead of going back to the queue. An
    attempt fails when its lease expires, when the car returns the request as failed, or when
    the car releases the lease with a reason starting ``error`` (``counts_as_failure``); a
    release for any other reason (preempted, policy, shutdown) is the car leaving, not the
    request failing, and does not count. Nothing loops: a request that crashes or wedges every
    car that runs it ends after ``max_attempts`` cars."""

    # -- files ---------------------------------------------------------------------------------
    @abstractmethod
    def put_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        """Store a file's metadata and content (given as chunks, so large files stream)."""

    @abstractmethod
    def get_file(self, file_id: str) -> FileRecord | None: ...

    @abstractmethod
    def read_file(self, file_id: str) -> Iterator[bytes]:
        """The file's content as chunks; ``KeyError`` if there is no such file."""

    @abstractmethod
    def delete_file(self, file_id: str) -> bool: ...

    @abstractmethod
    def batch_files(self, batch_id: str) -> list[FileRecord]:
        """The output and error files stored for a batch (``batch_id`` set), by id."""

    # -- batches -------------------------------------------------------------------------------
    @abstractmethod
    def create_batch(self, batch: BatchRecord) -> None: ...

    @abstractmethod
    def get_batch(self, batch_id: str) -> BatchRecord | None:
        """The batch with live request counts."""

    @abstractmethod
    def list_batches(
        self, limit: int, after: str | None = None, principal: str | None = None
    ) -> list[BatchRecord]:
        """Newest first; ``after`` is the id of the last batch of the previous page; with
        ``principal``, only that principal's batches."""

    @abstractmethod
    def batches_with_status(self, statuses: Collection[str]) -> list[BatchRecord]: ...

    @abstractmethod
    def claim_batch(
        self,
        batch_id: str,
        expect_status: Collection[str],
        owner: str,
        now: float,
        claim_seconds: float,
        **changes: Any,
    ) -> BatchRecord | None:
        """Claim a batch for a singleton duty, applying ``changes`` (e.g. a new status) with it.

        A compare-and-set: succeeds only if the status is in ``expect_status`` and the batch is
        unclaimed, already claimed by ``owner``, or its claim ran out (deadline < ``now``).
        The claim then lasts until ``now + claim_seconds``. Returns the updated batch or None.
        """

    @abstractmethod
    def finish_batch(
        self, batch_id: str, expect_status: Collection[str], owner: str, **changes: Any
    ) -> BatchRecord | None:
        """End a claimed duty: apply ``changes`` only while ``owner`` holds the claim.

        The claim is cleared, also when the status no longer matches (say a cancel came in
        during validation), so that the next duty on the batch need not wait for it to run
        out. Every other output or error file of the batch (a file whose ``batch_id`` is this
        batch, from an attempt that died half-way) is deleted in the same transaction, so the
        batch keeps exactly the files ``changes`` names. Returns the updated batch, or None
        (status differs, or the claim is someone else's).
        """

    @abstractmethod
    def update_batch(
        self, batch_id: str, expect_status: Collection[str], **changes: Any
    ) -> BatchRecord | None:
        """Apply ``changes`` only if the batch's status is in ``expect_status``.

        Returns the updated batch, or None if the batch does not exist or its status differs.
        """

    # -- requests and leases -------------------------------------------------------------------
    @abstractmethod
    def add_requests(self, batch_id: str, requests: Iterable[NewRequest]) -> int:
        """Add a batch's requests (once, at validation). Returns how many were added."""

    @abstractmethod
    def request_counts(self, batch_id: str) -> RequestCounts: ...

    @abstractmethod
    def request_payloads(self, batch_id: str, seqs: Collection[int]) -> dict[int, Any]:
        """The payloads of these requests, by seq (unknown seqs and requests without a payload,
        i.e. errors found at validation, left out)."""

    @abstractmethod
    def lease_units(
        self, asks: Sequence[LeaseAsk], now: float, lease_seconds: float
    ) -> list[Lease | Exception | None]:
        """Lease a unit to each ask, in order, in one transaction; see :meth:`lease_unit`.

        The answer has one entry per ask: the lease, None when there is nothing for it, or the
        exception its ``unit_size`` raised, in which case that ask changed nothing. Later asks
        never receive requests an earlier one got.
        """

    def lease_unit(
        self,
        vehicle_id: str,
        lease_id: str,
        models: Collection[str],
        now: float,
        lease_seconds: float,
        unit_size: Callable[[int], int],
        *,
        purposes: Collection[str],
        data_regions: Collection[str],
    ) -> Lease | None:
        """Lease pending requests of the oldest in-progress batch to ``vehicle_id``.

        MUST consider only batches whose ``purpose`` is in ``purposes`` and whose
        ``data_region`` is in ``data_regions`` (what the car's owner allows); an empty
        collection allows nothing. The lease carries the batch's purpose and data region.

        Largest requests go first (by ``sort_key``, the workload's compute estimate, then by
        ``seq``): a unit then holds inputs of similar length, which the model pads least, and
        the short ones are left for the end, where they even out the last cars' finishing
        times (LPT scheduling).

        ``unit_size(pending)`` gets the number of pending requests of the chosen batch and says
        how many to take. Returns None when there is nothing to lease for these models.
        """
        ask = LeaseAsk(
            vehicle_id, lease_id, tuple(models), tuple(purposes), tuple(data_regions), unit_size
        )
        (outcome,) = self.lease_units([ask], now, lease_seconds)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @abstractmethod
    def commit_many(
        self, commits: Sequence[ResultCommit], now: float, lease_seconds: float
    ) -> list[CommitOutcome | Exception]:
        """Commit each chunk, in order, in one transaction; see :meth:`commit_results`.

        One entry per chunk in the answer: its outcome, or ``ValueError`` for an ``energy_j``
        that is not a finite number >= 0, in which case that chunk changed nothing.
        """

    def commit_and_lease(
        self,
        commits: Sequence[ResultCommit],
        asks: Sequence[LeaseAsk],
        now: float,
        lease_seconds: float,
    ) -> tuple[list[CommitOutcome | Exception], list[Lease | Exception | None]]:
        """:meth:`commit_many` then :meth:`lease_units`, as ONE transaction.

        The coordinator's turn on the store: the results that came in and the cars waiting for
        work share one durable commit (one fsync), which is most of a turn's time on SQLite.
        This default runs them as two transactions; backends override it.
        """
        outcomes = self.commit_many(commits, now, lease_seconds) if commits else []
        leases = self.lease_units(asks, now, lease_seconds) if asks else []
        return outcomes, leases

    def commit_results(
        self,
        vehicle_id: str,
        lease_id: str,
        results: Iterable[RequestResult],
        now: float,
        lease_seconds: float,
        energy_j: float = 0.0,
    ) -> CommitOutcome:
        """Commit results of a lease held (now or before) by ``vehicle_id``; extend it if active.

        Results for requests that were not in this lease are ignored (not committed, not
        counted); an unknown lease or one of another vehicle gives ``unknown_lease=True``.
        ``energy_j`` (>= 0, what the car spent on the chunk) MUST be added to the lease's
        ``energy_j`` in the same transaction, also for a lease that has ended (a late chunk
        still cost energy), and never for an unknown lease.
        """
        chunk = ResultCommit(vehicle_id, lease_id, tuple(results), energy_j)
        (outcome,) = self.commit_many([chunk], now, lease_seconds)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @abstractmethod
    def get_lease(self, vehicle_id: str, lease_id: str) -> Lease | None:
        """The lease if ``vehicle_id`` holds or held it (``items`` left empty), else None."""

    @abstractmethod
    def list_leases(self, active_only: bool = True, limit: int = 1000) -> list[Lease]:
        """Leases (``items`` left empty), newest first."""

    @abstractmethod
    def record_progress(
        self,
        vehicle_id: str,
        lease_id: str,
        items: Sequence[tuple[int, bytes]],
        now: float,
        lease_seconds: float,
    ) -> CommitOutcome:
        """Keep a car's progress on requests of its lease, and extend the lease like a commit.

        ``items``: (seq, progress) pairs; only requests this lease still holds (``leased`` by
        it) get theirs replaced, the rest are ignored. The progress travels with the request
        from then on: a later lease of it (after this one is released or expires) carries it
        in ``LeasedItem.progress``. An active lease's deadline becomes ``now + lease_seconds``.
        Returns ``committed`` = progress records written, ``lease_active``, ``deadline`` (None
        once the lease is over), ``unknown_lease`` if the lease is not this vehicle's.
        """

    @abstractmethod
    def return_requests(self, vehicle_id: str, lease_id: str, seqs: Collection[int]) -> int:
        """Put unfinished requests of an active lease back in the queue (the rest stays leased):
        the car failed them, so each counts an attempt (``max_attempts``). Returns how many
        went back to the queue (not those that ran out of attempts)."""

    @abstractmethod
    def release_lease(
        self,
        vehicle_id: str,
        lease_id: str,
        now: float,
        reason: str = "",
        energy_j: float = 0.0,
    ) -> int | None:
        """End an active lease and return its unfinished requests to the queue.

        Returns how many requests went back, or None if the lease is unknown to this vehicle.
        A ``reason`` that ``counts_as_failure`` counts an attempt of each (``max_attempts``).
        The release that ends the lease records ``reason`` as its ``end_reason`` (empty: none);
        a lease that had already ended keeps how it ended. ``energy_j`` (>= 0) is added to the
        lease's energy either way, for any lease the vehicle holds or held.
        """

    @abstractmethod
    def expire_leases(self, now: float) -> int:
        """End every active lease past its deadline; each request it held counts an attempt
        (``max_attempts``). Returns the requests put back in the queue."""

    @abstractmethod
    def active_lease_count(self, batch_id: str) -> int: ...

    @abstractmethod
    def abandon_unfinished(self, batch_id: str, status: int, error_body: dict[str, Any]) -> int:
        """Mark every unfinished request failed with ``error_body`` (cancel, expiry)."""

    @abstractmethod
    def iter_requests(self, batch_id: str) -> Iterator[StoredRequest]:
        """Every request of the batch in input order."""

    @abstractmethod
    def vehicle_usage(self, batch_id: str) -> dict[str, int]:
        """Completed requests per vehicle for one batch."""

    # -- vehicles ------------------------------------------------------------------------------
    @abstractmethod
    def upsert_vehicles(self, records: Sequence[VehicleRecord]) -> None:
        """Register (or re-register) vehicles, all in one transaction."""

    def upsert_vehicle(self, record: VehicleRecord) -> None:
        self.upsert_vehicles([record])

    @abstractmethod
    def record_liveness(self, seen: Sequence[VehicleSeen]) -> int:
        """Write a batch of heartbeats: ``last_seen``, ``status``, ``status_reason``.

        Newest wins: a row is changed only if its ``last_seen`` is not newer than the one
        given, so replicas flushing out of order never move a car back in time. Unregistered
        vehicles are ignored. Returns how many rows changed.
        """

    @abstractmethod
    def count_live_vehicles(self, since: float) -> int:
        """How many vehicles were seen at or after ``since`` (O(live), not O(fleet))."""

    @abstractmethod
    def live_vehicles(self, since: float) -> list[VehicleLiveness]:
        """Vehicles seen at or after ``since``."""

    @abstractmethod
    def vehicle_liveness(self, vehicle_ids: Collection[str]) -> dict[str, VehicleLiveness]:
        """The registered vehicles among ``vehicle_ids``, by id."""

    @abstractmethod
    def touch_vehicle(
        self, vehicle_id: str, now: float, status: str, reason: str | None = None
    ) -> bool:
        """Record a heartbeat: ``last_seen``, ``status`` and ``status_reason`` (None clears it).

        False (and no change) if the vehicle is not registered.
        """

    @abstractmethod
    def get_vehicle(self, vehicle_id: str) -> VehicleRecord | None: ...

    @abstractmethod
    def list_vehicles(self) -> list[VehicleRecord]: ...

    # -- owner policies (append-only consent record) -------------------------------------------
    @abstractmethod
    def append_policy(
        self,
        vehicle_id: str,
        policy_json: str,
        actor: str,
        now: float,
        expect_version: int | None = None,
    ) -> PolicyRecord | None:
        """Append the next version of ``vehicle_id``'s policy: 1 for the first, else latest + 1.

        Atomic: concurrent appends get distinct, consecutive versions, and no earlier version
        is ever changed. With ``expect_version`` it is a compare-and-set: the append happens
        only if the latest version is ``expect_version`` (0: none yet), else None is returned
        and nothing changes, so a read-modify-write (consent) cannot undo a concurrent change.
        The vehicle need not be registered: an owner may set a policy before the car connects.
        """

    @abstractmethod
    def current_policy(self, vehicle_id: str) -> PolicyRecord | None:
        """The latest version of ``vehicle_id``'s policy, or None if none was ever set."""

    @abstractmethod
    def current_policies(self, vehicle_ids: Collection[str]) -> dict[str, PolicyRecord]:
        """The latest version of each vehicle's policy that has one, by vehicle id."""

    @abstractmethod
    def policies_since(self, since: float) -> list[PolicyRecord]:
        """Every version appended at or after ``since`` (``created_at``), oldest first."""

    @abstractmethod
    def policy_history(self, vehicle_id: str, limit: int = 1000) -> list[PolicyRecord]:
        """The latest ``limit`` versions of ``vehicle_id``'s policy, oldest first."""

    # -- who may do what: API keys and car enrolments -----------------------------------------
    @abstractmethod
    def put_api_key(self, record: ApiKeyRecord) -> None:
        """Store a new key; ``ValueError`` if its id or secret hash is taken."""

    @abstractmethod
    def api_key_by_hash(self, secret_sha256: str) -> ApiKeyRecord | None:
        """The key whose secret hashes to this, revoked or not (None: no such key)."""

    @abstractmethod
    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""

    @abstractmethod
    def revoke_api_key(self, key_id: str, now: float) -> bool:
        """Revoke a key; False if there is no such key or it was revoked already."""

    @abstractmethod
    def enrol(self, enrolment: Enrolment) -> None:
        """Register a car's public nkey. A car whose enrolment was revoked may be enrolled again
        (with a new key); ``ValueError`` if the car is enrolled and not revoked, or the nkey
        belongs to another car."""

    @abstractmethod
    def revoke_enrolment(self, vehicle_id: str, now: float) -> bool:
        """Cut a car off; False if it is not enrolled or revoked already."""

    @abstractmethod
    def get_enrolment(self, vehicle_id: str) -> Enrolment | None: ...

    @abstractmethod
    def enrolments(self, owner: str | None = None) -> list[Enrolment]:
        """Every enrolment (revoked ones too), of one owner if given, by vehicle id."""

    @abstractmethod
    def enrolment_revision(self) -> tuple[int, int, float, float]:
        """Changes whenever a car is enrolled, revoked or enrolled again, whatever the clocks
        of the replicas that did it say (so AuthSync never misses a revocation)."""

    @abstractmethod
    def queued_requests(self, principal: str) -> int:
        """Requests of ``principal``'s unfinished batches not yet done (pending or leased)."""

    # -- verification --------------------------------------------------------------------------
    @abstractmethod
    def get_trust(self, vehicle_ids: Collection[str]) -> dict[str, CarTrust]:
        """The trust records of these cars (a car never judged has none)."""

    @abstractmethod
    def put_trust(self, records: Sequence[CarTrust], now: float) -> None:
        """Write (insert or replace) these cars' trust records, in one transaction."""

    @abstractmethod
    def list_trust(self, quarantined_only: bool = False, limit: int = 10_000) -> list[CarTrust]:
        """Trust records by vehicle id (only quarantined cars', if asked)."""

    @abstractmethod
    def redo_results(self, vehicle_id: str) -> int:
        """Return the car's results in ``in_progress`` batches to the queue (pending, result
        cleared): how many. Finalised batches keep theirs."""

    @abstractmethod
    def withdraw_verdicts(self, verifier_id: str) -> int:
        """Delete the 'agree' verdicts this car gave on results in ``in_progress`` batches (it
        was quarantined: its word is worth nothing): how many. Finalised batches keep theirs."""

    @abstractmethod
    def done_requests(self, batch_id: str, seqs: Collection[int]) -> dict[int, DoneRequest]:
        """Those of these requests that are done, with their payload, result and car."""

    @abstractmethod
    def unverified_requests(self, batch_id: str, limit: int = 1000) -> list[DoneRequest]:
        """Done requests of a batch without an 'agree' verdict for the car that made their
        result, by seq (at most ``limit``)."""

    @abstractmethod
    def list_verdicts(self, batch_id: str) -> list[VerdictRow]:
        """The verdicts kept on a batch's results, by seq and car."""

    @abstractmethod
    def record_verdicts(self, rows: Sequence[VerdictRow]) -> None:
        """Keep verdicts on results; the first one for (batch, seq, car) stands."""

    @abstractmethod
    def record_verification(
        self, records: Sequence[CarTrust], verdicts: Sequence[VerdictRow], now: float
    ) -> None:
        """:meth:`put_trust` and :meth:`record_verdicts` in one transaction."""

    @abstractmethod
    def shared_secret(self, name: str) -> bytes:
        """A random secret (32 bytes) every replica reads the same; made by the first caller."""

    # -- ledger --------------------------------------------------------------------------------
    @abstractmethod
    def post_entries(self, entries: Sequence[Entry]) -> int:
        """Post ledger entries in one transaction, each at most once (by id; a second
        settlement of one charge is skipped too): how many were new."""

    @abstractmethod
    def lease_energy(self, batch_id: str) -> dict[str, float]:
        """Energy each car reported for its leases of a batch (joules), by car."""

    @abstractmethod
    def unsettled_charges(
        self, vehicle_id: str, through: float | None = None, limit: int = 10_000
    ) -> list[Entry]:
        """The car's charges not yet released or reversed (work up to ``through``)."""

    @abstractmethod
    def ledger_entries(
        self,
        *,
        owner: str | None = None,
        principal: str | None = None,
        vehicle_id: str | None = None,
        batch_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100_000,
        api_key_id: str | None = None,
    ) -> list[Entry]:
        """Entries matching every filter given, oldest first, with their postings."""

    @abstractmethod
    def balances(self, prefix: str = "") -> dict[str, int]:
        """Account balances (accounts starting with ``prefix``)."""

    # -- the fleet at a glance -----------------------------------------------------------------
    @abstractmethod
    def fleet_counts(self, live_since: float) -> FleetCounts:
        """Batches by status, the queue, active leases and cars by status (live since
        ``live_since``) or offline: aggregate reads only, for ``/metrics`` and the dashboard."""

    # -- retention -----------------------------------------------------------------------------
    @abstractmethod
    def prune_finished_requests(
        self, finished_before: float, now: float, max_batches: int = 20
    ) -> tuple[int, int]:
        """Delete the request rows and verdicts of up to ``max_batches`` batches (oldest
        first) that finished (completed, failed, expired, cancelled) before
        ``finished_before`` and were not pruned yet; their records, counts, files and ledger
        entries stay. Returns (batches pruned, request rows deleted)."""

    # -- lifecycle -----------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None: ...
