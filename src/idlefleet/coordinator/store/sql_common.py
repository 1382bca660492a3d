"""What the SQL backends share: column lists, checks on arguments, JSON and chunking helpers.

Pure functions and constants only; each backend keeps its own SQL (the dialects differ).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from idlefleet.coordinator.store.base import NewRequest, VehicleLiveness, VehicleRecord

LEASABLE_STATUSES = ("validating", "in_progress")
"""Statuses of a batch whose pending requests may be leased: a batch is validating while its
requests are stored, largest first, and cars start on the first ones meanwhile."""
LEASABLE = ", ".join(f"'{status}'" for status in LEASABLE_STATUSES)
"""The same, as an SQL list."""

FILE_CHUNK_BYTES = 4 * 1024 * 1024
"""Files are stored in pieces of this size, so a large one streams in and out."""

BATCH_COLUMNS = (
    "id, input_file_id, endpoint, completion_window, status, created_at, expires_at, metadata, "
    "errors, output_file_id, error_file_id, in_progress_at, finalizing_at, completed_at, "
    "failed_at, expired_at, cancelling_at, cancelled_at, purpose, data_region, principal, "
    "expected_requests, api_key_id"
)
BATCH_FIELDS = tuple(name.strip() for name in BATCH_COLUMNS.split(","))
UPDATABLE_BATCH_FIELDS = frozenset(
    {
        "status",
        "errors",
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    }
)


def list_batches_filter(
    after: str | None, principal: str | None, mark: str, column_prefix: str = ""
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause of a page of batches: after a batch id, of one principal."""
    clauses: list[str] = []
    args: list[Any] = []
    if after is not None:
        clauses.append(f"{column_prefix}seq_no < (SELECT seq_no FROM batches WHERE id = {mark})")
        args.append(after)
    if principal is not None:
        clauses.append(f"{column_prefix}principal = {mark}")
        args.append(principal)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def check_batch_changes(changes: dict[str, Any], allow_none: bool = False) -> None:
    """Refuse changes to fields that are not updatable (and, unless allowed, no change)."""
    unknown = set(changes) - UPDATABLE_BATCH_FIELDS
    if unknown:
        raise ValueError(f"cannot update batch fields {sorted(unknown)}")
    if not changes and not allow_none:
        raise ValueError("update_batch needs at least one change")


def check_energy(energy_j: float) -> None:
    if not (math.isfinite(energy_j) and energy_j >= 0):
        raise ValueError(f"energy_j must be a finite number >= 0, got {energy_j!r}")


ATTEMPTS_EXHAUSTED_STATUS = 500


def attempts_exhausted_body(attempts: int) -> dict[str, Any]:
    """The error file's body for a request that failed on every attempt (``Store.max_attempts``)."""
    return {
        "error": {
            "message": f"This request failed on {attempts} attempts: the cars that ran it "
            "failed, released it with an error or stopped answering. It is not retried again.",
            "type": "server_error",
            "param": None,
            "code": "request_failed",
        }
    }


def within_bytes(payloads_json: Sequence[str], max_bytes: int | None) -> int:
    """How many of a unit's requests (their stored payloads, in lease order) fit in
    ``max_bytes``: at least one, then while the running total of UTF-8 bytes stays within it."""
    if max_bytes is None:
        return len(payloads_json)
    total = 0
    for n, payload in enumerate(payloads_json):
        total += len(payload.encode("utf-8"))
        if n > 0 and total > max_bytes:
            return n
    return len(payloads_json)


def counts_as_failure(reason: str) -> bool:
    """Whether a car's release reason says the unit failed (not that the car left)."""
    return reason.strip().lower().startswith("error")


def dump_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


VEHICLE_COLUMNS = (
    "v.id, v.hardware, v.models, v.registered_at, v.last_seen, v.status, v.completed, "
    "v.status_reason"
)


def vehicle_from_row(row: tuple[Any, ...]) -> VehicleRecord:
    """A row of :data:`VEHICLE_COLUMNS`."""
    return VehicleRecord(
        id=row[0],
        hardware=json.loads(row[1]),
        models=tuple(json.loads(row[2])),
        registered_at=row[3],
        last_seen=row[4],
        status=row[5],
        completed_requests=int(row[6]),
        status_reason=row[7],
    )


def liveness_from_row(row: tuple[Any, ...]) -> VehicleLiveness:
    """A ``(id, models JSON, last_seen, status, status_reason)`` row."""
    return VehicleLiveness(row[0], tuple(json.loads(row[1])), row[2], row[3], row[4])


REQUEST_COLUMNS = (
    "batch_id, seq, custom_id, model, options, payload, sort_key, state, error_status, error_body"
)

NO_PAYLOAD = "null"
"""The stored payload of a request that failed validation (``NewRequest.payload`` None)."""


def request_rows(
    batch_id: str, requests: Iterable[NewRequest]
) -> tuple[list[tuple[Any, ...]], int]:
    """The rows of :data:`REQUEST_COLUMNS` for a batch's new requests, and how many failed
    validation (they go straight to the error file)."""
    rows = [
        (
            batch_id,
            r.seq,
            r.custom_id,
            r.model,
            r.options,
            json.dumps(r.payload, ensure_ascii=False),
            r.sort_key,
            "pending" if r.error_status is None else "failed",
            r.error_status,
            dump_json(r.error_body),
        )
        for r in requests
    ]
    return rows, sum(1 for row in rows if row[7] == "failed")


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup arbitrary chunks into pieces of ``size`` bytes (the last may be shorter)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)
