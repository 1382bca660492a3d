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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

RequestState = Literal["pending", "leased", "done", "failed"]


@dataclass(frozen=True)
class FileRecord:
    """Metadata of an uploaded or generated file (OpenAI File object)."""

    id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    status: str = "processed"


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


@dataclass(frozen=True)
class NewRequest:
    """A request of a batch as planned at validation.

    Either ``texts`` is set (to run) or ``error_status``/``error_body`` (a request-level error
    found at validation, which goes straight to the error file).
    """

    seq: int
    custom_id: str
    model: str = ""
    encoding_format: str = "float"
    texts: tuple[str, ...] = ()
    error_status: int | None = None
    error_body: dict[str, Any] | None = None


@dataclass(frozen=True)
class LeasedItem:
    seq: int
    custom_id: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Lease:
    """A unit of work handed to one vehicle until ``deadline``."""

    id: str
    batch_id: str
    vehicle_id: str
    model: str
    deadline: float
    items: tuple[LeasedItem, ...]
    state: str = "active"
    """``active``, or how it ended: ``finished``, ``released``, ``expired``."""


@dataclass(frozen=True)
class RequestResult:
    """The successful result of one request: float32 vectors (row-major bytes) and tokens."""

    seq: int
    vectors: bytes
    dim: int
    token_count: int
    body: bytes | None = None
    """The response body, already rendered as JSON (so finalisation only concatenates)."""


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
    encoding_format: str
    model: str
    vectors: bytes | None
    dim: int | None
    token_count: int | None
    error_status: int | None
    error_body: dict[str, Any] | None
    body: bytes | None = None


@dataclass(frozen=True)
class VehicleRecord:
    id: str
    hardware: dict[str, Any]
    models: tuple[str, ...]
    registered_at: float
    last_seen: float
    status: str = "idle"
    completed_requests: int = 0


class Store(ABC):
    """Persistent coordinator state. See the module docstring for the guarantees."""

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

    # -- batches -------------------------------------------------------------------------------
    @abstractmethod
    def create_batch(self, batch: BatchRecord) -> None: ...

    @abstractmethod
    def get_batch(self, batch_id: str) -> BatchRecord | None:
        """The batch with live request counts."""

    @abstractmethod
    def list_batches(self, limit: int, after: str | None = None) -> list[BatchRecord]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""

    @abstractmethod
    def batches_with_status(self, statuses: Collection[str]) -> list[BatchRecord]: ...

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
    def request_formats(self, batch_id: str, seqs: Collection[int]) -> dict[int, tuple[str, str]]:
        """(model, encoding_format) of the given requests, by seq."""

    @abstractmethod
    def lease_unit(
        self,
        vehicle_id: str,
        lease_id: str,
        models: Collection[str],
        now: float,
        lease_seconds: float,
        unit_size: Callable[[int], int],
    ) -> Lease | None:
        """Lease pending requests of the oldest in-progress batch to ``vehicle_id``.

        Longest requests go first (by ``sort_key``, the input's length): a unit then holds
        inputs of similar length, which the model pads least, and the short ones are left for
        the end, where they even out the last cars' finishing times (LPT scheduling).

        ``unit_size(pending)`` gets the number of pending requests of the chosen batch and says
        how many to take. Returns None when there is nothing to lease for these models.
        """

    @abstractmethod
    def commit_results(
        self,
        vehicle_id: str,
        lease_id: str,
        results: Iterable[RequestResult],
        now: float,
        lease_seconds: float,
    ) -> CommitOutcome:
        """Commit results of a lease held (now or before) by ``vehicle_id``; extend it if active.

        Results for requests that were not in this lease are ignored (not committed, not
        counted); an unknown lease or one of another vehicle gives ``unknown_lease=True``.
        """

    @abstractmethod
    def get_lease(self, vehicle_id: str, lease_id: str) -> Lease | None:
        """The lease if ``vehicle_id`` holds or held it (``items`` left empty), else None."""

    @abstractmethod
    def list_leases(self, active_only: bool = True, limit: int = 1000) -> list[Lease]:
        """Leases (``items`` left empty), newest first."""

    @abstractmethod
    def return_requests(self, vehicle_id: str, lease_id: str, seqs: Collection[int]) -> int:
        """Put unfinished requests of an active lease back in the queue (the rest stays leased)."""

    @abstractmethod
    def release_lease(self, vehicle_id: str, lease_id: str, now: float) -> int | None:
        """End an active lease and return its unfinished requests to the queue.

        Returns how many requests went back, or None if the lease is unknown to this vehicle.
        """

    @abstractmethod
    def expire_leases(self, now: float) -> int:
        """End every active lease past its deadline. Returns the requests put back."""

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
    def upsert_vehicle(self, record: VehicleRecord) -> None: ...

    @abstractmethod
    def touch_vehicle(self, vehicle_id: str, now: float, status: str) -> bool:
        """Record a heartbeat; False if the vehicle is not registered."""

    @abstractmethod
    def get_vehicle(self, vehicle_id: str) -> VehicleRecord | None: ...

    @abstractmethod
    def list_vehicles(self) -> list[VehicleRecord]: ...

    # -- lifecycle -----------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None: ...
