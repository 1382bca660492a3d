"""The batch lifecycle: files in, validation, progress, finalisation, cancel and expiry.

Status machine (as OpenAI's): ``validating`` → ``in_progress`` → ``finalizing`` → ``completed``;
``validating`` → ``failed`` when the input file itself is bad; ``in_progress`` → ``cancelling``
→ ``cancelled``; past the completion window → ``expired``.

Several coordinator replicas run this code on one store. Every transition is a compare-and-set
in the store, and every duty that takes more than one step (validating a file, writing the
output files of a finished, cancelled or expired batch) is done under a batch *claim*
(:meth:`Store.claim_batch`): one attempt at a time holds it, renews it while it works, and ends
it with :meth:`Store.finish_batch`, which succeeds only for the holder and keeps exactly the
output files it names. If the holder dies, its claim runs out (``claim_seconds``) and the
sweeper of any replica takes the duty over from the start (:meth:`BatchService.sweep`), so
neither a crash nor a race loses a batch or leaves it with two sets of output files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from idlefleet.coordinator.accounts import Accounts, Tally
from idlefleet.coordinator.batch_input import SUPPORTED_ENDPOINTS, parse_batch_input
from idlefleet.coordinator.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
)
from idlefleet.coordinator.openai_format import (
    batch_errors_object,
    derived_id,
    error_line,
    new_id,
    output_line,
    output_line_json,
)
from idlefleet.coordinator.store import (
    BatchRecord,
    FileRecord,
    NewRequest,
    Store,
    StoredRequest,
    StoreUnavailable,
)
from idlefleet.protocol.policy import DATA_REGIONS, DEFAULT_DATA_REGION, DEFAULT_PURPOSE, PURPOSES
from idlefleet.workloads import Workload, by_endpoint

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": 24 * 3600}
RENDER_BLOCK = 1024
"""Requests whose response bodies finalisation renders in one numpy pass."""
FILE_PURPOSES = ("batch",)
TERMINAL = ("completed", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class BatchLimits:
    max_file_bytes: int = 200 * 1024 * 1024
    max_requests: int = 50_000
    max_metadata_pairs: int = 16
    claim_seconds: float = 30.0
    """How long a claim on a batch duty lasts unless renewed; a dead replica's duty is taken
    over this long after its last renewal."""
    validation_attempts: int = 3
    """Attempts at storing a validated batch's requests before the batch fails (a store outage,
    ``StoreUnavailable``, does not count): no input may keep a batch validating for ever."""
    finalization_attempts: int = 3
    """Attempts at writing a finished batch's output files before the batch fails (a store
    outage does not count): a result no code can render must not keep it finalising for ever."""
    first_slice: int = 1024
    """Requests stored (largest first) before the batch may be leased; the rest follow in
    slices of ``slice`` while cars already work (lease while validating)."""
    slice: int = 8192
    request_retention_seconds: float = 3600.0
    """How long a finished batch keeps its per-request rows (payloads, results, verdicts)
    once its output and error files are written: long enough for probes of its late results;
    then only the batch, its files, counts and ledger entries stay (the store would otherwise
    grow with every request ever served)."""


class BatchService:
    """Customer-facing batch operations over a :class:`Store`."""

    def __init__(
        self,
        store: Store,
        limits: BatchLimits | None = None,
        clock: Callable[[], float] = time.time,
        replica: str = "coordinator",
    ) -> None:
        self.store = store
        self.limits = limits or BatchLimits()
        self._validation_failures: dict[str, int] = {}
        self._finalization_failures: dict[str, int] = {}
        self.clock = clock
        self.replica = replica
        """Names this replica in the claims it takes (with a fresh suffix per attempt)."""
        self._quota_locks: dict[str, threading.Lock] = {}
        self._next_prune = 0.0
        """When sweep next deletes finished batches' request rows (at most once a minute)."""
        self._locks_lock = threading.Lock()
        self.on_foreign: Callable[[str, str], None] = lambda principal, object_id: None
        """Called when ``principal`` asks for an object that exists but is another's (the
        answer is still "not found"); the API counts these as refusals."""
        self.on_work: Callable[[], None] = lambda: None
        """Called (from the validating thread) once a batch's first requests may be leased,
        before its validation ends; the coordinator announces the work to the cars."""
        self.finalize_gate: Callable[[BatchRecord], bool] | None = None
        self.accounts: Accounts | None = None
        """The ledger's edge: a finalised batch's charges are posted (before it is marked
        finished; idempotent, so a retried finalisation posts nothing twice)."""
        """Asked before a batch whose work is done is finalised: False holds it (verification
        holds a strict batch until every result is agreed); None: nothing holds batches."""

    def _claim(self, batch_id: str, expect: list[str], **changes: Any) -> str | None:
        """Claim a duty on the batch for a new attempt; its owner id, or None if taken."""
        owner = f"{self.replica}/{uuid.uuid4().hex[:12]}"
        claimed = self.store.claim_batch(
            batch_id, expect, owner, self.clock(), self.limits.claim_seconds, **changes
        )
        return owner if claimed is not None else None

    # -- files ---------------------------------------------------------------------------------
    def check_upload(self, purpose: str, size: int) -> None:
        """Refuse an upload before storing it: wrong purpose or too large."""
        if purpose not in FILE_PURPOSES:
            raise InvalidRequest(
                f"Invalid value for 'purpose': {purpose!r}. Supported values are: 'batch'.",
                param="purpose",
                code="invalid_value",
            )
        if size > self.limits.max_file_bytes:
            raise PayloadTooLarge(
                f"File is too large: {size} bytes; the maximum for purpose 'batch' is "
                f"{self.limits.max_file_bytes} bytes.",
                code="file_too_large",
                param="file",
            )

    # Ownership: ``principal`` None is the coordinator itself or an operator (sees all); a
    # customer's principal sees only what it made, and a batch's output files through the
    # batch. Another principal's object is "not found", never "forbidden": its existence is
    # not the caller's business (OpenAI answers the same).
    def upload_file(
        self, filename: str, purpose: str, data: bytes, principal: str | None = None
    ) -> FileRecord:
        self.check_upload(purpose, len(data))
        if "\x00" in filename:  # no store's text may hold it (PostgreSQL refuses)
            raise InvalidRequest(
                "Invalid 'file': its filename must not contain NUL characters.",
                param="file",
                code="invalid_value",
            )
        record = FileRecord(
            id=new_id("file-"),
            purpose=purpose,
            filename=filename or "upload.jsonl",
            bytes=len(data),
            created_at=int(self.clock()),
            principal=principal,
        )
        self.store.put_file(record, [data])
        return record

    def get_file(
        self, file_id: str, principal: str | None = None, param: str = "file_id"
    ) -> FileRecord:
        record = self.store.get_file(file_id)
        if record is not None and not self._owns_file(record, principal):
            self.on_foreign(principal or "", file_id)
            record = None
        if record is None:
            raise NotFound(f"No such File object: {file_id}", param=param)
        return record

    def _owns_file(self, record: FileRecord, principal: str | None) -> bool:
        if principal is None or record.principal == principal:
            return True
        if record.principal is None and record.batch_id is not None:
            batch = self.store.get_batch(record.batch_id)
            return batch is not None and batch.principal == principal
        return False

    def file_content(self, file_id: str, principal: str | None = None) -> Iterator[bytes]:
        self.get_file(file_id, principal)
        return self.store.read_file(file_id)

    # -- batches -------------------------------------------------------------------------------
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None = None,
        purpose: str = DEFAULT_PURPOSE,
        data_region: str = DEFAULT_DATA_REGION,
        principal: str | None = None,
        queued_limit: int | None = None,
        api_key_id: str | None = None,
    ) -> BatchRecord:
        """Accept a batch (status ``validating``) for ``principal``, asked with the key
        ``api_key_id`` (its charges are that key's usage).

        ``purpose`` and ``data_region`` are our extensions to OpenAI's request: what the
        results are used for and where the data may be processed. Only cars whose owners allow
        both will run the batch's units.
        """
        _check_choice("purpose", purpose, PURPOSES)
        _check_choice("data_region", data_region, DATA_REGIONS)
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise InvalidRequest(
                f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                + ", ".join(repr(e) for e in SUPPORTED_ENDPOINTS)
                + ".",
                param="endpoint",
                code="invalid_value",
            )
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(
                f"Invalid value for 'completion_window': {completion_window!r}. "
                "Supported values are: '24h'.",
                param="completion_window",
                code="invalid_value",
            )
        _check_metadata(metadata, self.limits.max_metadata_pairs)
        record = self.get_file(input_file_id, principal, param="input_file_id")
        if record.purpose != "batch":
            raise InvalidRequest(
                f"File {input_file_id} has purpose {record.purpose!r}; a batch input file "
                "must be uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        expected = None
        quota_lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if principal is not None and queued_limit is not None:
            # Checked and created under one lock per principal: parallel requests to this
            # replica cannot all pass on the same count (replicas do not share the lock).
            with self._locks_lock:
                quota_lock = self._quota_locks.setdefault(principal, threading.Lock())
        now = int(self.clock())
        batch = BatchRecord(
            id=new_id("batch_"),
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            status="validating",
            created_at=now,
            expires_at=now + COMPLETION_WINDOWS[completion_window],
            metadata=metadata,
            purpose=purpose,
            data_region=data_region,
            principal=principal,
            api_key_id=api_key_id,
        )
        with quota_lock:
            if principal is not None and queued_limit is not None:
                expected = self._check_queue(principal, input_file_id, queued_limit)
            batch = dataclasses.replace(batch, expected_requests=expected)
            self.store.create_batch(batch)
        return batch

    def _check_queue(self, principal: str, input_file_id: str, limit: int) -> int:
        """Refuse a batch that would take ``principal`` past ``limit`` queued requests: its
        lines (one request each) plus what its unfinished batches still have to do. Returns
        the batch's lines."""
        queued = self.store.queued_requests(principal)
        lines = 0
        ends_with_newline = True
        for chunk in self.store.read_file(input_file_id):
            lines += chunk.count(b"\n")
            if chunk:
                ends_with_newline = chunk.endswith(b"\n")
        lines += 0 if ends_with_newline else 1
        if queued + lines > limit:
            raise RateLimited(
                f"Enqueued request limit reached: this key may have {limit} batch requests "
                f"queued; {queued} are queued and this batch adds {lines}. Wait for batches "
                "to finish, or ask the operator for a higher limit.",
                code="request_limit_exceeded",
                headers={
                    "x-ratelimit-limit-queued-requests": str(limit),
                    "x-ratelimit-remaining-queued-requests": str(max(0, limit - queued)),
                },
            )
        return lines

    def get_batch(self, batch_id: str, principal: str | None = None) -> BatchRecord:
        batch = self.store.get_batch(batch_id)
        if batch is not None and principal is not None and batch.principal != principal:
            self.on_foreign(principal, batch_id)
            batch = None
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def list_batches(
        self, limit: int, after: str | None, principal: str | None = None
    ) -> tuple[list[BatchRecord], bool]:
        if not 1 <= limit <= 100:
            raise InvalidRequest(
                f"Invalid 'limit': {limit}. Expected a value between 1 and 100.",
                param="limit",
                code="invalid_value",
            )
        if after is not None:
            found = self.store.get_batch(after)
            if found is None or (principal is not None and found.principal != principal):
                raise NotFound(f"No batch found with id '{after}'.", param="after")
        page = self.store.list_batches(limit + 1, after, principal)
        return page[:limit], len(page) > limit

    def validate(self, batch_id: str) -> BatchRecord:
        """Parse the input file: requests go to the queue, or the batch fails with ``errors``.

        Under a claim, so that of several replicas only one validates a batch; one that finds
        it claimed returns the batch as it is (the claim's holder, or after it dies the
        sweeper, finishes the job).
        """
        batch = self.get_batch(batch_id)
        if batch.status != "validating":
            return batch
        owner = self._claim(batch_id, ["validating"])
        if owner is None:
            return batch
        data = b"".join(self.store.read_file(batch.input_file_id))
        try:
            parsed = parse_batch_input(data, batch.endpoint, max_requests=self.limits.max_requests)
            errors = batch_errors_object(parsed.errors)["data"]
        except Exception as exc:  # a validator bug must fail this batch, not wedge it
            log.exception("validating batch %s crashed", batch_id)
            errors = [
                {
                    "code": "validation_error",
                    "message": f"The input file could not be validated: {type(exc).__name__}.",
                    "param": None,
                    "line": None,
                }
            ]
        now = int(self.clock())
        if errors:
            updated = self.store.finish_batch(
                batch_id,
                ["validating"],
                owner,
                status="failed",
                failed_at=now,
                errors={"object": "list", "data": errors},
            )
            return updated or self.get_batch(batch_id)
        try:
            self._store_requests(batch_id, owner, parsed.requests)
        except StoreUnavailable:
            raise  # an outage: the sweeper tries again when the store is back
        except _ClaimLost:
            # Cancelled meanwhile, or taken over: let go at once (a no-op if not ours).
            self.store.finish_batch(batch_id, ["validating"], owner)
            return self.get_batch(batch_id)
        except Exception as exc:
            return self._validation_crashed(batch_id, owner, exc)
        self._validation_failures.pop(batch_id, None)
        updated = self.store.finish_batch(
            batch_id, ["validating"], owner, status="in_progress", in_progress_at=now
        )
        batch = updated or self.get_batch(batch_id)
        self.maybe_finalize(batch_id)
        return batch

    def _store_requests(self, batch_id: str, owner: str, specs: list[Any]) -> None:
        """Store a validated batch's requests, largest first, a slice per transaction. The
        batch is leasable while ``validating`` (the store leases from it as soon as it holds
        requests; it is never finalised before ``in_progress``), so cars start on the first
        slice while the rest is stored: they take the largest requests first either way.

        A slice is stored whole or not at all, in a fixed order, so an attempt after one that
        died half-way stores only the rest. Each slice first renews the claim: a validation
        that lost it (it stalled past ``claim_seconds``) stores nothing more.
        """
        planned = [_new_request(i, spec) for i, spec in enumerate(specs)]
        planned.sort(key=lambda r: (-r.sort_key, r.seq))
        start = self.store.request_counts(batch_id).total
        announced = start > 0
        while start < len(planned):
            size = self.limits.slice if announced else self.limits.first_slice
            if start > 0 and not self.store.claim_batch(
                batch_id, ["validating"], owner, self.clock(), self.limits.claim_seconds
            ):
                raise _ClaimLost(batch_id)
            self.store.add_requests(batch_id, planned[start : start + size])
            start += size
            if not announced:
                announced = True
                self.on_work()

    def _validation_crashed(self, batch_id: str, owner: str, exc: Exception) -> BatchRecord:
        """Count a failed attempt at storing a batch's requests; fail the batch after
        ``validation_attempts`` (per replica), else free the claim for the next attempt."""
        self._validation_failures[batch_id] = tries = self._validation_failures.get(batch_id, 0) + 1
        log.error("storing the requests of batch %s failed (attempt %d): %r", batch_id, tries, exc)
        if tries < self.limits.validation_attempts:
            self.store.finish_batch(batch_id, ["validating"], owner)
            return self.get_batch(batch_id)
        self._validation_failures.pop(batch_id, None)
        error = {
            "code": "validation_error",
            "message": f"The batch's requests could not be stored after {tries} attempts "
            f"({type(exc).__name__}); the batch was not run to the end.",
            "param": None,
            "line": None,
        }
        updated = self.store.finish_batch(
            batch_id,
            ["validating"],
            owner,
            status="failed",
            failed_at=int(self.clock()),
            errors={"object": "list", "data": [error]},
        )
        return updated or self.get_batch(batch_id)

    def cancel(self, batch_id: str, principal: str | None = None) -> BatchRecord:
        batch = self.get_batch(batch_id, principal)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        now = int(self.clock())
        updated = self.store.update_batch(
            batch_id, ["validating", "in_progress"], status="cancelling", cancelling_at=now
        )
        if updated is None:
            current = self.get_batch(batch_id)
            raise Conflict(
                f"Cannot cancel a batch with status '{current.status}'.",
                code="invalid_state",
                param="batch_id",
            )
        self.maybe_finalize(batch_id)
        return self.get_batch(batch_id)

    # -- progress and the end of a batch -------------------------------------------------------
    def maybe_finalize(self, batch_id: str) -> None:
        """Move a batch on if its work is over (all done, or cancelling with no live lease)."""
        batch = self.store.get_batch(batch_id)
        if batch is None:
            return
        now = int(self.clock())
        if batch.status == "in_progress" and batch.request_counts.unfinished == 0:
            if self.finalize_gate is not None and not self.finalize_gate(batch):
                return  # verification holds it (a strict batch with results not yet agreed)
            owner = self._claim(batch_id, ["in_progress"], status="finalizing", finalizing_at=now)
            if owner is not None:
                self._write_results(batch_id, owner, "completed", completed_at=int(self.clock()))
        elif batch.status == "cancelling" and self.store.active_lease_count(batch_id) == 0:
            owner = self._claim(batch_id, ["cancelling"])
            if owner is not None:
                self.store.abandon_unfinished(
                    batch_id,
                    400,
                    _error_body("batch_cancelled", "This request was cancelled with its batch."),
                )
                self._write_results(batch_id, owner, "cancelled", cancelled_at=now)

    def expire(self, batch_id: str) -> None:
        """Close a batch whose completion window has passed; unfinished requests are errors."""
        owner = self._claim(batch_id, ["in_progress", "validating"], status="finalizing")
        if owner is not None:
            self._expire_claimed(batch_id, owner)

    def _expire_claimed(self, batch_id: str, owner: str) -> None:
        self.store.abandon_unfinished(
            batch_id,
            400,
            _error_body(
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
        )
        self._write_results(batch_id, owner, "expired", expired_at=int(self.clock()))

    def sweep(self) -> int:
        """Periodic upkeep, safe on every replica at once: expire leases and overdue batches,
        finish batches whose work is over, and take over duties whose claim ran out (a replica
        died validating or finalising; at start-up this is the recovery after a crash).

        Returns how many requests expired leases put back in the queue.
        """
        now = self.clock()
        returned = self.store.expire_leases(now)
        for batch in self.store.batches_with_status(["in_progress", "validating"]):
            if batch.expires_at <= now:
                self._safely(batch.id, self.expire)
        for batch in self.store.batches_with_status(["cancelling", "in_progress"]):
            self._safely(batch.id, self.maybe_finalize)
        for batch in self.store.batches_with_status(["validating"]):
            self._safely(batch.id, self.validate)
        for batch in self.store.batches_with_status(["finalizing"]):
            self._safely(batch.id, self._resume_finalizing)
        if now >= self._next_prune:
            self._next_prune = now + min(60.0, self.limits.request_retention_seconds)
            self.store.prune_finished_requests(now - self.limits.request_retention_seconds, now)
        return returned

    def recover(self) -> None:
        """After a restart: redo what a crash interrupted, once the dead attempt's claim is out."""
        self.sweep()

    def _resume_finalizing(self, batch_id: str) -> None:
        owner = self._claim(batch_id, ["finalizing"])
        if owner is None:
            return  # a live attempt holds it
        batch = self.get_batch(batch_id)
        if batch.expires_at <= self.clock() and batch.request_counts.unfinished:
            self._expire_claimed(batch_id, owner)
        else:
            self._write_results(batch_id, owner, "completed", completed_at=int(self.clock()))

    @staticmethod
    def _safely(batch_id: str, step: Callable[[str], Any]) -> None:
        try:
            step(batch_id)
        except Exception:  # one broken batch must not stop the upkeep of the others
            log.exception("upkeep of batch %s failed", batch_id)

    def _write_results(self, batch_id: str, owner: str, final_status: str, **stamps: int) -> None:
        """Write the output and error files, then set the final status, under ``owner``'s claim.

        If the claim was lost meanwhile (this attempt stalled past ``claim_seconds`` and
        another took over), the files written here are deleted again and nothing changes. An
        attempt that fails frees the claim for the next (the sweeper's); after
        ``finalization_attempts`` the batch fails instead.
        """
        try:
            output_id, error_id = self._write_files(batch_id, owner)
        except StoreUnavailable:
            raise  # an outage: the sweeper tries again once the claim runs out
        except Exception as exc:
            self._finalization_failed(batch_id, owner, exc)
            return
        self._finalization_failures.pop(batch_id, None)
        done = self.store.finish_batch(
            batch_id,
            ["finalizing", "cancelling"],
            owner,
            status=final_status,
            output_file_id=output_id,
            error_file_id=error_id,
            **stamps,
        )
        if done is None:
            log.warning("lost the claim on %s while writing its results; discarding", batch_id)
            for file_id in (output_id, error_id):
                if file_id:
                    self.store.delete_file(file_id)

    def _write_files(self, batch_id: str, owner: str) -> tuple[str | None, str | None]:
        """Render and store the output and error files (ids; None: no lines), and post the
        charges for the results in the output."""
        output_id = error_id = None
        batch = self.get_batch(batch_id)
        workload = by_endpoint(batch.endpoint)
        if workload is None:  # only endpoints with a workload are accepted at create
            raise ValueError(f"batch {batch_id} has an endpoint no workload serves")
        tallies: dict[tuple[str, str], Tally] = {}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            n_out, n_err = self._render(workload, batch_id, out, err, owner, tallies)
            if n_out:
                output_id = self._store_spool(out, f"{batch_id}_output.jsonl", batch_id)
            if n_err:
                error_id = self._store_spool(err, f"{batch_id}_error.jsonl", batch_id)
        if self.accounts is not None and tallies:
            self.accounts.batch_finished(batch, tallies)
        return output_id, error_id

    def _finalization_failed(self, batch_id: str, owner: str, exc: Exception) -> None:
        """Count a failed attempt at a batch's output files (per replica); free the claim for
        the next attempt, or fail the batch after ``finalization_attempts``. Either way the
        store drops the files the attempt wrote (``finish_batch`` keeps only those named)."""
        failures = self._finalization_failures
        failures[batch_id] = tries = failures.get(batch_id, 0) + 1
        log.error("writing the results of batch %s failed (attempt %d): %r", batch_id, tries, exc)
        ending = ["finalizing", "cancelling"]
        if tries < self.limits.finalization_attempts:
            self.store.finish_batch(batch_id, ending, owner)
            return
        failures.pop(batch_id, None)
        error = {
            "code": "finalization_error",
            "message": f"The batch's output files could not be written after {tries} attempts "
            f"({type(exc).__name__}).",
            "param": None,
            "line": None,
        }
        self.store.finish_batch(
            batch_id,
            ending,
            owner,
            status="failed",
            failed_at=int(self.clock()),
            errors={"object": "list", "data": [error]},
        )

    def _render(
        self,
        workload: Workload,
        batch_id: str,
        out: BinaryIO,
        err: BinaryIO,
        owner: str,
        tallies: dict[tuple[str, str], Tally],
    ) -> tuple[int, int]:
        counts = [0, 0]  # output lines, error lines
        renew_at = time.monotonic() + self.limits.claim_seconds / 3
        block: list[StoredRequest] = []
        for req in self.store.iter_requests(batch_id):
            if time.monotonic() >= renew_at:  # a long batch: keep the claim alive
                self.store.claim_batch(
                    batch_id,
                    ["finalizing", "cancelling"],
                    owner,
                    self.clock(),
                    self.limits.claim_seconds,
                )
                renew_at = time.monotonic() + self.limits.claim_seconds / 3
            block.append(req)
            if len(block) >= RENDER_BLOCK:
                _render_block(workload, batch_id, block, out, err, counts, tallies)
                block = []
        _render_block(workload, batch_id, block, out, err, counts, tallies)
        return counts[0], counts[1]

    def _store_spool(self, spool: BinaryIO, filename: str, batch_id: str) -> str:
        size = spool.tell()
        spool.seek(0)
        record = FileRecord(
            id=new_id("file-"),
            purpose="batch_output",
            filename=filename,
            bytes=size,
            created_at=int(self.clock()),
            batch_id=batch_id,
        )
        self.store.put_file(record, iter(lambda: spool.read(1024 * 1024), b""))
        return record.id


class _ClaimLost(Exception):
    """This attempt no longer holds the batch's claim (another one took it over, or a cancel
    changed its status): it must stop storing."""

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"lost the claim on {batch_id} while storing its requests")


def _render_block(
    workload: Workload,
    batch_id: str,
    block: list[StoredRequest],
    out: BinaryIO,
    err: BinaryIO,
    counts: list[int],
    tallies: dict[tuple[str, str], Tally],
) -> None:
    """Write the lines of consecutive requests; the workload renders the block's response
    bodies at once (for embeddings, one numpy pass over every vector: most of the cost).
    Each result written is tallied for its car's charge."""
    bodies = workload.render_batch(block)
    lines: list[bytes] = []
    errors: list[bytes] = []
    for req in block:
        request_id = derived_id("batch_req_", batch_id, req.seq)
        body = bodies.get(req.seq)
        if req.state == "done" and body is not None:
            response_id = derived_id("", batch_id, req.seq, "response")
            lines.append(output_line_json(request_id, req.custom_id, 200, body, response_id))
            if req.vehicle_id is not None and req.result is not None:
                tally = tallies.setdefault((req.vehicle_id, req.model), Tally())
                used_in, used_out = workload.usage(req.result, req.token_count or 0)
                tally.requests += 1
                tally.input_tokens += used_in
                tally.output_tokens += used_out
        elif req.error_body is not None and req.error_status is not None:
            error = req.error_body.get("error", {})
            if error.get("code") in ("batch_cancelled", "batch_expired"):
                errors.append(
                    error_line(request_id, req.custom_id, error["code"], error["message"])
                )
            else:
                errors.append(
                    output_line(request_id, req.custom_id, req.error_status, req.error_body)
                )
    out.write(b"".join(lines))  # one write per block, not per line
    err.write(b"".join(errors))
    counts[0] += len(lines)
    counts[1] += len(errors)


def _new_request(seq: int, spec: Any) -> NewRequest:
    if spec.error is not None:
        return NewRequest(
            seq=seq,
            custom_id=spec.custom_id,
            error_status=spec.error.http_status,
            error_body=spec.error.to_openai(),
        )
    planned = spec.planned
    return NewRequest(
        seq=seq,
        custom_id=spec.custom_id,
        model=planned.model,
        options=planned.options,
        payload=planned.payload,
        sort_key=planned.cost.compute,
    )


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": "invalid_request_error"}}


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRequest(
            f"Invalid value for '{name}': {value!r}. Supported values are: "
            + ", ".join(repr(a) for a in allowed)
            + ".",
            param=name,
            code="invalid_value",
        )


def _check_metadata(metadata: dict[str, str] | None, max_pairs: int) -> None:
    if metadata is None:
        return
    if len(metadata) > max_pairs:
        raise InvalidRequest(
            f"Invalid 'metadata': at most {max_pairs} key-value pairs are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise InvalidRequest(
                "Invalid 'metadata': keys are strings of at most 64 characters and values "
                "strings of at most 512 characters.",
                param="metadata",
                code="invalid_value",
            )
