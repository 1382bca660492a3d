"""SQLite backend of :class:`~idlefleet.coordinator.store.base.Store` (the embedded default).

One database file in the data directory, WAL journal, ``synchronous=FULL`` so that whatever a
call has returned survives a crash of the process or the machine. Writers take the database lock
up front (``BEGIN IMMEDIATE``), which serialises leasing between threads and between processes
sharing the file, so no request is ever in two active leases.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from idlefleet.coordinator.store.base import (
    BatchRecord,
    CommitOutcome,
    FileRecord,
    Lease,
    LeaseAsk,
    LeasedItem,
    NewRequest,
    PolicyRecord,
    RequestCounts,
    RequestResult,
    ResultCommit,
    Store,
    StoredRequest,
    VehicleLiveness,
    VehicleRecord,
    VehicleSeen,
)
from idlefleet.coordinator.store.commit_plan import LeaseRow, plan_commits
from idlefleet.coordinator.store.identity_sql import IdentitySql
from idlefleet.coordinator.store.ledger_sql import LedgerSql
from idlefleet.coordinator.store.migrations import MIGRATIONS
from idlefleet.coordinator.store.overview_sql import OverviewSql
from idlefleet.coordinator.store.retention_sql import RetentionSql
from idlefleet.coordinator.store.sql_common import (
    ATTEMPTS_EXHAUSTED_STATUS,
    BATCH_COLUMNS,
    BATCH_FIELDS,
    FILE_CHUNK_BYTES,
    LEASABLE_STATUSES,
    NO_PAYLOAD,
    REQUEST_COLUMNS,
    VEHICLE_COLUMNS,
    attempts_exhausted_body,
    check_batch_changes,
    check_energy,
    counts_as_failure,
    dump_json,
    list_batches_filter,
    liveness_from_row,
    load_json,
    rechunk,
    request_rows,
    vehicle_from_row,
    within_bytes,
)
from idlefleet.coordinator.store.verification_sql import VerificationSql

T = TypeVar("T")


class SqliteStore(IdentitySql, VerificationSql, LedgerSql, OverviewSql, RetentionSql, Store):
    _mark = "?"
    _unique_violation = sqlite3.IntegrityError

    def __init__(self, path: str) -> None:
        self._path = path
        self._memory = path == ":memory:" or path.startswith("file::memory:")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._checkpointer: _Checkpointer | None = None
        self._migrate()
        if not self._memory:
            self._checkpointer = _Checkpointer(path)
            # Checkpoints (WAL pages copied into the database file, and its fsync) run on a
            # thread of their own, so writers never pay for one: ~10% of a lease and commit.
            self._db.execute("PRAGMA wal_autocheckpoint=0")

    # -- plumbing ------------------------------------------------------------------------------
    def _enable_wal(self, timeout: float = 30.0) -> None:
        # Switching a new file to WAL needs an exclusive lock and, unlike other statements,
        # fails at once instead of waiting when another process holds the write lock (two
        # replicas starting on a fresh data directory), so wait here ourselves.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if self._checkpointer is not None:
            self._checkpointer.wrote()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reading, this thread's own: readers never wait for a writer's
        fsync (WAL lets them read the last commit meanwhile). Each statement sees every
        transaction committed before it began."""
        if self._memory:  # an in-memory database lives in one connection only
            with self._lock:
                yield self._db
            return
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA query_only=ON")
            self._local.db = db
            with self._lock:
                self._readers.append(db)
        yield db

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        if write:
            with self._write() as db:
                return work(db)
        with self._read() as db:
            return work(db)

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for migration in MIGRATIONS:
                if migration.version in done:
                    continue
                for statement in _statements(migration.sql("sqlite")):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )

    def schema_version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._db.close()

    # -- files ---------------------------------------------------------------------------------
    def put_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO files (id, purpose, filename, bytes, created_at, status, batch_id, "
                "principal) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.purpose,
                    record.filename,
                    record.bytes,
                    record.created_at,
                    record.status,
                    record.batch_id,
                    record.principal,
                ),
            )
            for part, chunk in enumerate(rechunk(chunks, FILE_CHUNK_BYTES)):
                db.execute("INSERT INTO file_chunks VALUES (?, ?, ?)", (record.id, part, chunk))

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._read() as db:
            row = db.execute(
                "SELECT id, purpose, filename, bytes, created_at, status, batch_id, principal "
                "FROM files "
                "WHERE id = ?",
                (file_id,),
            ).fetchone()
        return FileRecord(*row) if row else None

    def read_file(self, file_id: str) -> Iterator[bytes]:
        with self._read() as db:
            if self.get_file(file_id) is None:
                raise KeyError(file_id)
            (parts,) = db.execute(
                "SELECT COUNT(*) FROM file_chunks WHERE file_id = ?", (file_id,)
            ).fetchone()
        return self._chunks(file_id, parts)

    def _chunks(self, file_id: str, parts: int) -> Iterator[bytes]:
        # Chunk by chunk, so a large file streams; a file deleted meanwhile is an error, never
        # a silently shorter file.
        for part in range(parts):
            with self._read() as db:
                row = db.execute(
                    "SELECT data FROM file_chunks WHERE file_id = ? AND part = ?", (file_id, part)
                ).fetchone()
            if row is None:
                raise KeyError(file_id)
            yield bytes(row[0])

    def batch_files(self, batch_id: str) -> list[FileRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT id, purpose, filename, bytes, created_at, status, batch_id, principal "
                "FROM files "
                "WHERE batch_id = ? ORDER BY id",
                (batch_id,),
            ).fetchall()
        return [FileRecord(*row) for row in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM file_chunks WHERE file_id = ?", (file_id,))
            return db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # -- batches -------------------------------------------------------------------------------
    def create_batch(self, batch: BatchRecord) -> None:
        with self._write() as db:
            (seq_no,) = db.execute("SELECT COALESCE(MAX(seq_no), 0) + 1 FROM batches").fetchone()
            db.execute(
                f"INSERT INTO batches ({BATCH_COLUMNS}, seq_no) "
                f"VALUES ({', '.join('?' * (len(BATCH_FIELDS) + 1))})",
                (
                    batch.id,
                    batch.input_file_id,
                    batch.endpoint,
                    batch.completion_window,
                    batch.status,
                    batch.created_at,
                    batch.expires_at,
                    dump_json(batch.metadata),
                    dump_json(batch.errors),
                    batch.output_file_id,
                    batch.error_file_id,
                    batch.in_progress_at,
                    batch.finalizing_at,
                    batch.completed_at,
                    batch.failed_at,
                    batch.expired_at,
                    batch.cancelling_at,
                    batch.cancelled_at,
                    batch.purpose,
                    batch.data_region,
                    batch.principal,
                    batch.expected_requests,
                    batch.api_key_id,
                    seq_no,
                ),
            )

    def _batch_from_row(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> BatchRecord:
        fields = dict(zip(BATCH_FIELDS, row, strict=True))
        fields["metadata"] = load_json(fields["metadata"])
        fields["errors"] = load_json(fields["errors"])
        return BatchRecord(**fields, request_counts=self._counts(db, fields["id"]))

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._read() as db:
            return self._get_batch(db, batch_id)

    def _get_batch(self, db: sqlite3.Connection, batch_id: str) -> BatchRecord | None:
        row = db.execute(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        return self._batch_from_row(db, row) if row else None

    def list_batches(
        self, limit: int, after: str | None = None, principal: str | None = None
    ) -> list[BatchRecord]:
        where, args = list_batches_filter(after, principal, "?")
        with self._read() as db:
            rows = db.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches {where} ORDER BY seq_no DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [self._batch_from_row(db, row) for row in rows]

    def batches_with_status(self, statuses: Collection[str]) -> list[BatchRecord]:
        marks = ",".join("?" * len(statuses))
        with self._read() as db:
            rows = db.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY seq_no",
                tuple(statuses),
            ).fetchall()
            return [self._batch_from_row(db, row) for row in rows]

    def update_batch(
        self, batch_id: str, expect_status: Collection[str], **changes: Any
    ) -> BatchRecord | None:
        check_batch_changes(changes)
        with self._write() as db:
            return self._update_batch(db, batch_id, expect_status, "", (), changes)

    def claim_batch(
        self,
        batch_id: str,
        expect_status: Collection[str],
        owner: str,
        now: float,
        claim_seconds: float,
        **changes: Any,
    ) -> BatchRecord | None:
        check_batch_changes(changes, allow_none=True)
        changes = {**changes, "claim_owner": owner, "claim_until": now + claim_seconds}
        with self._write() as db:
            return self._update_batch(
                db,
                batch_id,
                expect_status,
                " AND (claim_owner IS NULL OR claim_owner = ? OR claim_until < ?)",
                (owner, now),
                changes,
            )

    def finish_batch(
        self, batch_id: str, expect_status: Collection[str], owner: str, **changes: Any
    ) -> BatchRecord | None:
        check_batch_changes(changes, allow_none=True)
        changes = {**changes, "claim_owner": None, "claim_until": None}
        with self._write() as db:
            finished = self._update_batch(
                db, batch_id, expect_status, " AND claim_owner = ?", (owner,), changes
            )
            if finished is None:  # the status moved on (a cancel): let the claim go anyway
                db.execute(
                    "UPDATE batches SET claim_owner = NULL, claim_until = NULL "
                    "WHERE id = ? AND claim_owner = ?",
                    (batch_id, owner),
                )
                return None
            keep = [f for f in (finished.output_file_id, finished.error_file_id) if f]
            marks = ",".join("?" * len(keep)) or "NULL"
            db.execute(
                f"DELETE FROM files WHERE batch_id = ? AND id NOT IN ({marks})",
                (batch_id, *keep),
            )
            return finished

    def _update_batch(
        self,
        db: sqlite3.Connection,
        batch_id: str,
        expect_status: Collection[str],
        condition: str,
        condition_args: tuple[Any, ...],
        changes: dict[str, Any],
    ) -> BatchRecord | None:
        if "errors" in changes:
            changes["errors"] = dump_json(changes["errors"])
        assignments = ", ".join(f"{name} = ?" for name in changes)
        marks = ",".join("?" * len(expect_status))
        updated = db.execute(
            f"UPDATE batches SET {assignments} WHERE id = ? AND status IN ({marks}){condition}",
            (*changes.values(), batch_id, *expect_status, *condition_args),
        ).rowcount
        # Read back inside the transaction: the record is this update's, not a later one's.
        return self._get_batch(db, batch_id) if updated else None

    # -- requests and leases -------------------------------------------------------------------
    def add_requests(self, batch_id: str, requests: Iterable[NewRequest]) -> int:
        rows, failed = request_rows(batch_id, requests)
        with self._write() as db:
            db.executemany(
                f"INSERT INTO requests ({REQUEST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # The trigger keeps the counts from here on; new rows are counted once, here.
            db.execute(
                "INSERT INTO batch_counts (batch_id, shard, pending, failed) VALUES (?, 0, ?, ?) "
                "ON CONFLICT (batch_id, shard) DO UPDATE SET "
                "pending = pending + excluded.pending, failed = failed + excluded.failed",
                (batch_id, len(rows) - failed, failed),
            )
        return len(rows)

    @staticmethod
    def _counts(db: sqlite3.Connection, batch_id: str) -> RequestCounts:
        row = db.execute(
            "SELECT SUM(pending), SUM(leased), SUM(done), SUM(failed) FROM batch_counts "
            "WHERE batch_id = ?",
            (batch_id,),
        ).fetchone()
        pending, leased, done, failed = (int(n or 0) for n in row)
        return RequestCounts(
            total=pending + leased + done + failed,
            completed=done,
            failed=failed,
            pending=pending,
            leased=leased,
        )

    def request_counts(self, batch_id: str) -> RequestCounts:
        with self._read() as db:
            return self._counts(db, batch_id)

    def request_payloads(self, batch_id: str, seqs: Collection[int]) -> dict[int, Any]:
        if not seqs:
            return {}
        with self._read() as db:
            rows = db.execute(
                "SELECT seq, payload FROM requests WHERE batch_id = ? "
                "AND seq IN (SELECT value FROM json_each(?)) AND payload <> ?",
                (batch_id, json.dumps(sorted(seqs)), NO_PAYLOAD),
            ).fetchall()
        # One JSON parse for all of them.
        payloads = json.loads("[" + ",".join(row[1] for row in rows) + "]")
        return {row[0]: payload for row, payload in zip(rows, payloads, strict=True)}

    def lease_units(
        self, asks: Sequence[LeaseAsk], now: float, lease_seconds: float
    ) -> list[Lease | Exception | None]:
        with self._write() as db:
            return self._lease_all(db, asks, now, lease_seconds)

    def commit_and_lease(
        self,
        commits: Sequence[ResultCommit],
        asks: Sequence[LeaseAsk],
        now: float,
        lease_seconds: float,
    ) -> tuple[list[CommitOutcome | Exception], list[Lease | Exception | None]]:
        with self._write() as db:
            outcomes = self._commit_all(db, commits, now, lease_seconds)
            return outcomes, self._lease_all(db, asks, now, lease_seconds)

    def _lease_all(
        self, db: sqlite3.Connection, asks: Sequence[LeaseAsk], now: float, lease_seconds: float
    ) -> list[Lease | Exception | None]:
        outcomes: list[Lease | Exception | None] = []
        # Within one call only leasing happens, which only takes work away: the batch chosen
        # for a kind of ask stays the right one until it runs dry for it, a kind that found
        # nothing finds nothing again, and a batch's pending count only falls by what we take.
        chosen: dict[tuple[Any, ...], tuple[str, str, str, str] | None] = {}
        pending: dict[str, int] = {}
        for ask in asks:
            try:
                outcome = self._lease_one(db, ask, now, lease_seconds, chosen, pending)
            except _AskFailed as failed:  # raised before this ask wrote anything
                outcomes.append(failed.cause)
                continue
            outcomes.append(outcome)
        return outcomes

    def _lease_one(
        self,
        db: sqlite3.Connection,
        ask: LeaseAsk,
        now: float,
        lease_seconds: float,
        chosen: dict[tuple[Any, ...], tuple[str, str, str, str] | None],
        pending: dict[str, int],
    ) -> Lease | None:
        models, purposes, regions = ask.models, ask.purposes, ask.data_regions
        if not (models and purposes and regions):
            return None  # nothing allowed (and ``IN ()`` is not SQL everywhere)
        key = (models, purposes, regions)
        model_marks = ",".join("?" * len(models))
        purpose_marks = ",".join("?" * len(purposes))
        region_marks = ",".join("?" * len(regions))
        while True:
            if key not in chosen:
                # The oldest leasable batch: one query per leasable status, each an ordered
                # walk of the (status, seq_no) index (an IN over statuses would sort them).
                found_by_status = [
                    db.execute(
                        "SELECT b.seq_no, b.id, b.purpose, b.data_region, b.endpoint FROM "
                        f"batches b WHERE b.status = ? AND b.purpose IN ({purpose_marks}) "
                        f"AND b.data_region IN ({region_marks}) AND EXISTS ("
                        "SELECT 1 FROM requests r WHERE r.batch_id = b.id "
                        f"AND r.state = 'pending' AND r.model IN ({model_marks})) "
                        "ORDER BY b.seq_no LIMIT 1",
                        (status, *purposes, *regions, *models),
                    ).fetchone()
                    for status in LEASABLE_STATUSES
                ]
                oldest = min((row for row in found_by_status if row), default=None)
                chosen[key] = None if oldest is None else oldest[1:]
            found = chosen[key]
            if found is None:
                return None
            batch_id, purpose, data_region, endpoint = found
            if batch_id not in pending:
                pending[batch_id] = self._counts(db, batch_id).pending
            try:
                size = max(1, ask.unit_size(pending[batch_id]))
            except Exception as exc:
                raise _AskFailed(exc) from exc
            picked = db.execute(
                "SELECT seq, custom_id, payload, model, progress FROM requests "
                f"WHERE batch_id = ? AND state = 'pending' AND model IN ({model_marks}) "
                "ORDER BY sort_key DESC, seq LIMIT ?",
                (batch_id, *models, size),
            ).fetchall()
            if picked:
                break
            del chosen[key]  # this batch ran dry for these models in this call: choose again
        # One lease carries one model: keep the picked requests of the first one's model, as
        # many as fit the unit's byte bound (the rest stay pending).
        model = picked[0][3]
        picked = [p for p in picked if p[3] == model]
        picked = picked[: within_bytes([p[2] for p in picked], ask.max_bytes)]
        seqs = [p[0] for p in picked]
        pending[batch_id] -= len(seqs)
        deadline = now + lease_seconds
        db.execute(
            "INSERT INTO leases (id, batch_id, vehicle_id, model, seqs, created_at, "
            "deadline, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'active')",
            (ask.lease_id, batch_id, ask.vehicle_id, model, json.dumps(seqs), now, deadline),
        )
        db.execute(
            "UPDATE requests SET state = 'leased', lease_id = ? "
            f"WHERE batch_id = ? AND seq IN ({','.join('?' * len(seqs))})",
            (ask.lease_id, batch_id, *seqs),
        )
        # One JSON parse for every request's payload.
        payloads = json.loads("[" + ",".join(p[2] for p in picked) + "]")
        items = tuple(
            LeasedItem(p[0], p[1], payload, p[4])
            for p, payload in zip(picked, payloads, strict=True)
        )
        return Lease(
            ask.lease_id,
            batch_id,
            ask.vehicle_id,
            model,
            deadline,
            items,
            endpoint=endpoint,
            purpose=purpose,
            data_region=data_region,
        )

    def commit_many(
        self, commits: Sequence[ResultCommit], now: float, lease_seconds: float
    ) -> list[CommitOutcome | Exception]:
        with self._write() as db:
            return self._commit_all(db, commits, now, lease_seconds)

    def _commit_all(
        self,
        db: sqlite3.Connection,
        commits: Sequence[ResultCommit],
        now: float,
        lease_seconds: float,
    ) -> list[CommitOutcome | Exception]:
        """Commit a turn's chunks in a few statements (see ``commit_plan``), or one by one
        in the rare turn a plan cannot order."""
        plan = plan_commits(
            commits, *self._commit_inputs(db, commits), now=now, lease_seconds=lease_seconds
        )
        if plan is None:
            return self._commit_each(db, commits, now, lease_seconds)
        if plan.results:
            db.executemany(
                "UPDATE requests SET state = 'done', result = ?, token_count = ?, vehicle_id = ?, "
                "lease_id = ? WHERE batch_id = ? AND seq = ? AND state IN ('pending', 'leased')",
                [
                    (r.result, r.token_count, vehicle_id, lease_id, batch_id, r.seq)
                    for batch_id, vehicle_id, lease_id, r in plan.results
                ],
            )
            db.executemany(
                "UPDATE vehicles SET completed = completed + ? WHERE id = ?",
                [(n, vehicle_id) for vehicle_id, n in plan.completed.items()],
            )
        for other in sorted(plan.maybe_closed):
            self._close_if_finished(db, other)
        if plan.extended:
            db.executemany(
                "UPDATE leases SET deadline = ?, energy_j = energy_j + ?, state = ? WHERE id = ?",
                plan.extended,
            )
        if plan.energy_only:
            db.executemany(
                "UPDATE leases SET energy_j = energy_j + ? WHERE id = ?", plan.energy_only
            )
        return plan.outcomes

    @staticmethod
    def _commit_inputs(
        db: sqlite3.Connection, commits: Sequence[ResultCommit]
    ) -> tuple[dict[str, LeaseRow], dict[tuple[str, int], tuple[str, str | None]]]:
        """The leases ``commits`` name and where each of their requests stands: one query for
        the leases, one per batch for the requests (by primary key, through ``json_each``)."""
        leases = {
            lease_id: LeaseRow(vehicle_id, batch_id, tuple(json.loads(seqs)), state)
            for lease_id, vehicle_id, batch_id, seqs, state in db.execute(
                "SELECT id, vehicle_id, batch_id, seqs, state FROM leases "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted({c.lease_id for c in commits})),),
            )
        }
        wanted: dict[str, set[int]] = {}
        for row in leases.values():
            wanted.setdefault(row.batch_id, set()).update(row.seqs)
        states: dict[tuple[str, int], tuple[str, str | None]] = {}
        for batch_id, seqs in wanted.items():
            for seq, state, holder in db.execute(
                "SELECT seq, state, lease_id FROM requests WHERE batch_id = ? "
                "AND seq IN (SELECT value FROM json_each(?))",
                (batch_id, json.dumps(sorted(seqs))),
            ):
                states[(batch_id, seq)] = (state, holder)
        return leases, states

    def _commit_each(
        self,
        db: sqlite3.Connection,
        commits: Sequence[ResultCommit],
        now: float,
        lease_seconds: float,
    ) -> list[CommitOutcome | Exception]:
        outcomes: list[CommitOutcome | Exception] = []
        for chunk in commits:
            try:
                check_energy(chunk.energy_j)  # refused before anything is written
            except ValueError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(self._commit_one(db, chunk, now, lease_seconds))
        return outcomes

    def _commit_one(
        self, db: sqlite3.Connection, chunk: ResultCommit, now: float, lease_seconds: float
    ) -> CommitOutcome:
        lease = db.execute(
            "SELECT batch_id, seqs, state, deadline FROM leases WHERE id = ? AND vehicle_id = ?",
            (chunk.lease_id, chunk.vehicle_id),
        ).fetchone()
        if lease is None:
            return CommitOutcome(0, 0, False, None, unknown_lease=True)
        batch_id, seqs_json, state, deadline = lease
        leased: list[int] = json.loads(seqs_json)
        # Where every request of the lease stands, by primary key (a condition on ``state``
        # would make SQLite walk every leased request of the batch instead).
        now_in = {
            seq: (state_, holder)
            for seq, state_, holder in db.execute(
                "SELECT seq, state, lease_id FROM requests "
                f"WHERE batch_id = ? AND seq IN ({','.join('?' * len(leased))})",
                (batch_id, *leased),
            )
        }
        mine = [r for r in chunk.results if r.seq in now_in]
        first: dict[int, RequestResult] = {}  # the first result of a request wins
        for r in mine:
            if r.seq not in first and now_in[r.seq][0] in ("pending", "leased"):
                first[r.seq] = r
        if first:
            db.executemany(
                "UPDATE requests SET state = 'done', result = ?, token_count = ?, vehicle_id = ?, "
                "lease_id = ? WHERE batch_id = ? AND seq = ? AND state IN ('pending', 'leased')",
                [
                    (r.result, r.token_count, chunk.vehicle_id, chunk.lease_id, batch_id, r.seq)
                    for r in first.values()
                ],
            )
        if first:
            db.execute(
                "UPDATE vehicles SET completed = completed + ? WHERE id = ?",
                (len(first), chunk.vehicle_id),
            )
        # A late answer may finish requests another car's lease holds now: close those leases
        # too once nothing in them is left open.
        for other in {
            now_in[seq][1]
            for seq in first
            if now_in[seq][0] == "leased" and now_in[seq][1] != chunk.lease_id
        }:
            self._close_if_finished(db, other)
        active = state == "active"
        finished = False
        if active:
            deadline = now + lease_seconds
            finished = not any(
                now_in[seq] == ("leased", chunk.lease_id) and seq not in first for seq in leased
            )
            db.execute(
                "UPDATE leases SET deadline = ?, energy_j = energy_j + ?, state = ? WHERE id = ?",
                (deadline, chunk.energy_j, "finished" if finished else "active", chunk.lease_id),
            )
        elif chunk.energy_j:
            db.execute(
                "UPDATE leases SET energy_j = energy_j + ? WHERE id = ?",
                (chunk.energy_j, chunk.lease_id),
            )
        return CommitOutcome(
            len(first),
            len(mine) - len(first),
            active,
            deadline if active else None,
            lease_finished=finished,
        )

    @staticmethod
    def _lease_rows(db: sqlite3.Connection, lease_id: str) -> tuple[str, list[int]]:
        """The batch and the requests (seqs) a lease was given."""
        batch_id, seqs = db.execute(
            "SELECT batch_id, seqs FROM leases WHERE id = ?", (lease_id,)
        ).fetchone()
        return batch_id, json.loads(seqs)

    def _close_if_finished(self, db: sqlite3.Connection, lease_id: str) -> bool:
        # By primary key over the lease's own requests: O(unit), no index on lease_id needed.
        batch_id, seqs = self._lease_rows(db, lease_id)
        (open_items,) = db.execute(
            f"SELECT COUNT(*) FROM requests WHERE batch_id = ? AND seq IN ({_marks(seqs)}) "
            "AND lease_id = ? AND state = 'leased'",
            (batch_id, *seqs, lease_id),
        ).fetchone()
        if open_items:
            return False
        return (
            db.execute(
                "UPDATE leases SET state = 'finished' WHERE id = ? AND state = 'active'",
                (lease_id,),
            ).rowcount
            > 0
        )

    def _requeue(
        self,
        db: sqlite3.Connection,
        lease_id: str,
        failed: bool,
        only: Collection[int] | None = None,
    ) -> int:
        """Put the requests a lease still holds (those in ``only``, if given) back in the
        queue; how many went back. ``failed``: the attempt failed, so each counts one, and
        those out of attempts end failed instead (``Store.max_attempts``)."""
        batch_id, held = self._lease_rows(db, lease_id)
        seqs = held if only is None else sorted(set(only) & set(held))
        if not seqs:
            return 0
        where = (
            f"WHERE batch_id = ? AND seq IN ({_marks(seqs)}) AND lease_id = ? AND state = 'leased'"
        )
        args = (batch_id, *seqs, lease_id)
        if failed:
            db.execute(
                "UPDATE requests SET state = 'failed', attempts = attempts + 1, "
                f"error_status = ?, error_body = ?, lease_id = NULL {where} AND attempts + 1 >= ?",
                (
                    ATTEMPTS_EXHAUSTED_STATUS,
                    dump_json(attempts_exhausted_body(self.max_attempts)),
                    *args,
                    self.max_attempts,
                ),
            )
        bump = "attempts = attempts + 1, " if failed else ""
        return int(
            db.execute(
                f"UPDATE requests SET {bump}state = 'pending', lease_id = NULL {where}", args
            ).rowcount
        )

    def get_lease(self, vehicle_id: str, lease_id: str) -> Lease | None:
        found = self._leases("WHERE l.id = ? AND l.vehicle_id = ?", (lease_id, vehicle_id))
        return found[0] if found else None

    def list_leases(self, active_only: bool = True, limit: int = 1000) -> list[Lease]:
        where = "WHERE l.state = 'active'" if active_only else ""
        return self._leases(f"{where} ORDER BY l.created_at DESC LIMIT ?", (limit,))

    def _leases(self, tail: str, args: tuple[Any, ...]) -> list[Lease]:
        # Endpoint, purpose and region are the batch's (fixed at creation): read from it.
        with self._read() as db:
            rows = db.execute(
                "SELECT l.id, l.batch_id, l.vehicle_id, l.model, l.deadline, l.state, "
                "b.purpose, b.data_region, l.energy_j, l.end_reason, b.endpoint "
                f"FROM leases l JOIN batches b ON b.id = l.batch_id {tail}",
                args,
            ).fetchall()
        return [
            Lease(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                (),
                endpoint=r[10],
                state=r[5],
                purpose=r[6],
                data_region=r[7],
                energy_j=r[8],
                end_reason=r[9],
            )
            for r in rows
        ]

    def record_progress(
        self,
        vehicle_id: str,
        lease_id: str,
        items: Sequence[tuple[int, bytes]],
        now: float,
        lease_seconds: float,
    ) -> CommitOutcome:
        with self._write() as db:
            lease = db.execute(
                "SELECT batch_id, seqs, state FROM leases WHERE id = ? AND vehicle_id = ?",
                (lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return CommitOutcome(0, 0, False, None, unknown_lease=True)
            batch_id, seqs_json, state = lease
            if state != "active":  # its requests went back to the queue or are finished
                return CommitOutcome(0, 0, False, None)
            given = set(json.loads(seqs_json))
            latest = {seq: progress for seq, progress in items if seq in given}  # last wins
            written = 0
            if latest:
                # By primary key; the holder and state conditions leave out what the lease no
                # longer holds (finished, or returned to the queue).
                written = db.executemany(
                    "UPDATE requests SET progress = ? WHERE batch_id = ? AND seq = ? "
                    "AND lease_id = ? AND state = 'leased'",
                    [(progress, batch_id, seq, lease_id) for seq, progress in latest.items()],
                ).rowcount
            deadline = now + lease_seconds
            db.execute("UPDATE leases SET deadline = ? WHERE id = ?", (deadline, lease_id))
        return CommitOutcome(written, 0, True, deadline)

    def return_requests(self, vehicle_id: str, lease_id: str, seqs: Collection[int]) -> int:
        with self._write() as db:
            lease = db.execute(
                "SELECT batch_id FROM leases WHERE id = ? AND vehicle_id = ? AND state = 'active'",
                (lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return 0
            returned = self._requeue(db, lease_id, failed=True, only=seqs)
            self._close_if_finished(db, lease_id)
        return returned

    def release_lease(
        self,
        vehicle_id: str,
        lease_id: str,
        now: float,
        reason: str = "",
        energy_j: float = 0.0,
    ) -> int | None:
        check_energy(energy_j)
        with self._write() as db:
            lease = db.execute(
                "SELECT state FROM leases WHERE id = ? AND vehicle_id = ?", (lease_id, vehicle_id)
            ).fetchone()
            if lease is None:
                return None
            if energy_j:
                db.execute(
                    "UPDATE leases SET energy_j = energy_j + ? WHERE id = ?", (energy_j, lease_id)
                )
            if lease[0] != "active":
                return 0
            db.execute(
                "UPDATE leases SET state = 'released', end_reason = ? WHERE id = ?",
                (reason or None, lease_id),
            )
            return self._requeue(db, lease_id, failed=counts_as_failure(reason))

    def expire_leases(self, now: float) -> int:
        with self._write() as db:
            expired = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM leases WHERE state = 'active' AND deadline < ?", (now,)
                ).fetchall()
            ]
            returned = 0
            for lease_id in expired:
                db.execute("UPDATE leases SET state = 'expired' WHERE id = ?", (lease_id,))
                returned += self._requeue(db, lease_id, failed=True)
        return returned

    def active_lease_count(self, batch_id: str) -> int:
        with self._read() as db:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM leases WHERE batch_id = ? AND state = 'active'", (batch_id,)
            ).fetchone()
        return int(n)

    def abandon_unfinished(self, batch_id: str, status: int, error_body: dict[str, Any]) -> int:
        with self._write() as db:
            db.execute(
                "UPDATE leases SET state = 'released' WHERE batch_id = ? AND state = 'active'",
                (batch_id,),
            )
            return db.execute(
                "UPDATE requests SET state = 'failed', error_status = ?, error_body = ?, "
                "lease_id = NULL WHERE batch_id = ? AND state IN ('pending', 'leased')",
                (status, dump_json(error_body), batch_id),
            ).rowcount

    def iter_requests(self, batch_id: str) -> Iterator[StoredRequest]:
        last = -1
        while True:
            with self._read() as db:
                rows = db.execute(
                    "SELECT seq, custom_id, state, options, model, result, token_count, "
                    "error_status, error_body, vehicle_id FROM requests "
                    "WHERE batch_id = ? AND seq > ? ORDER BY seq LIMIT 1000",
                    (batch_id, last),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                values = list(row)
                values[5] = bytes(values[5]) if values[5] is not None else None
                values[8] = load_json(values[8])
                yield StoredRequest(*values)
            last = rows[-1][0]

    def vehicle_usage(self, batch_id: str) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute(
                "SELECT vehicle_id, COUNT(*) FROM requests WHERE batch_id = ? AND state = 'done' "
                "GROUP BY vehicle_id",
                (batch_id,),
            ).fetchall()
        return {vid: n for vid, n in rows}

    # -- vehicles ------------------------------------------------------------------------------
    def upsert_vehicles(self, records: Sequence[VehicleRecord]) -> None:
        with self._write() as db:
            db.executemany(
                "INSERT INTO vehicles (id, hardware, models, registered_at, last_seen, status, "
                "status_reason) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "hardware = excluded.hardware, models = excluded.models, "
                "last_seen = excluded.last_seen, status = excluded.status, "
                "status_reason = excluded.status_reason",
                [
                    (
                        r.id,
                        json.dumps(r.hardware),
                        json.dumps(list(r.models)),
                        r.registered_at,
                        r.last_seen,
                        r.status,
                        r.status_reason,
                    )
                    for r in records
                ],
            )

    def record_liveness(self, seen: Sequence[VehicleSeen]) -> int:
        with self._write() as db:
            changed = db.executemany(
                "UPDATE vehicles SET last_seen = ?, status = ?, status_reason = ? "
                "WHERE id = ? AND last_seen <= ?",
                [(s.last_seen, s.status, s.status_reason, s.vehicle_id, s.last_seen) for s in seen],
            ).rowcount
        return max(0, changed)

    def count_live_vehicles(self, since: float) -> int:
        with self._read() as db:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM vehicles WHERE last_seen >= ?", (since,)
            ).fetchone()
        return int(n)

    _LIVENESS_COLUMNS = "id, models, last_seen, status, status_reason"

    def live_vehicles(self, since: float) -> list[VehicleLiveness]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._LIVENESS_COLUMNS} FROM vehicles WHERE last_seen >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return [liveness_from_row(row) for row in rows]

    def vehicle_liveness(self, vehicle_ids: Collection[str]) -> dict[str, VehicleLiveness]:
        ids = list(vehicle_ids)
        found: dict[str, VehicleLiveness] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            part = ids[start : start + 500]
            with self._read() as db:
                rows = db.execute(
                    f"SELECT {self._LIVENESS_COLUMNS} FROM vehicles "
                    f"WHERE id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
            found.update((row[0], liveness_from_row(row)) for row in rows)
        return found

    def touch_vehicle(
        self, vehicle_id: str, now: float, status: str, reason: str | None = None
    ) -> bool:
        with self._write() as db:
            return (
                db.execute(
                    "UPDATE vehicles SET last_seen = ?, status = ?, status_reason = ? WHERE id = ?",
                    (now, status, reason, vehicle_id),
                ).rowcount
                > 0
            )

    def _vehicles(self, where: str, args: tuple[Any, ...]) -> list[VehicleRecord]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {VEHICLE_COLUMNS} FROM vehicles v {where} ORDER BY v.id", args
            ).fetchall()
        return [vehicle_from_row(row) for row in rows]

    def get_vehicle(self, vehicle_id: str) -> VehicleRecord | None:
        found = self._vehicles("WHERE v.id = ?", (vehicle_id,))
        return found[0] if found else None

    def list_vehicles(self) -> list[VehicleRecord]:
        return self._vehicles("", ())

    # -- owner policies ------------------------------------------------------------------------
    _POLICY_COLUMNS = "vehicle_id, version, policy, actor, created_at"

    def append_policy(
        self,
        vehicle_id: str,
        policy_json: str,
        actor: str,
        now: float,
        expect_version: int | None = None,
    ) -> PolicyRecord | None:
        # BEGIN IMMEDIATE makes read-latest-then-insert one step for every writer; the primary
        # key would refuse a duplicate version even without it.
        with self._write() as db:
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM owner_policies WHERE vehicle_id = ?",
                (vehicle_id,),
            ).fetchone()
            if expect_version is not None and latest != expect_version:
                return None
            record = PolicyRecord(vehicle_id, int(latest) + 1, policy_json, actor, now)
            db.execute(
                f"INSERT INTO owner_policies ({self._POLICY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (record.vehicle_id, record.version, record.policy_json, actor, now),
            )
        return record

    def current_policy(self, vehicle_id: str) -> PolicyRecord | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = ? "
                "ORDER BY version DESC LIMIT 1",
                (vehicle_id,),
            ).fetchone()
        return PolicyRecord(*row) if row else None

    def current_policies(self, vehicle_ids: Collection[str]) -> dict[str, PolicyRecord]:
        ids = list(vehicle_ids)
        found: dict[str, PolicyRecord] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            with self._read() as db:
                rows = db.execute(
                    f"SELECT {self._POLICY_COLUMNS} FROM owner_policies p WHERE vehicle_id IN "
                    f"({','.join('?' * len(part))}) AND version = (SELECT MAX(version) FROM "
                    "owner_policies q WHERE q.vehicle_id = p.vehicle_id)",
                    part,
                ).fetchall()
            found.update((row[0], PolicyRecord(*row)) for row in rows)
        return found

    def policies_since(self, since: float) -> list[PolicyRecord]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE created_at >= ? "
                "ORDER BY created_at, vehicle_id, version",
                (since,),
            ).fetchall()
        return [PolicyRecord(*row) for row in rows]

    def policy_history(self, vehicle_id: str, limit: int = 1000) -> list[PolicyRecord]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = ? "
                "ORDER BY version DESC LIMIT ?",
                (vehicle_id, limit),
            ).fetchall()
        return [PolicyRecord(*row) for row in reversed(rows)]


class _Checkpointer:
    """Copies the WAL into the database file from a connection and thread of its own.

    A PASSIVE checkpoint never blocks writers or readers; it copies what no reader still
    needs, and the next writer starts the WAL over once everything was copied. Runs at most
    every ``interval_s``, and only after writes.
    """

    def __init__(self, path: str, interval_s: float = 0.5) -> None:
        self._path = path
        self._interval_s = interval_s
        self._written = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        self._written.set()

    def stop(self) -> None:
        self._stopping.set()
        self._written.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stopping.is_set():
                self._written.wait()
                self._written.clear()
                if self._stopping.wait(self._interval_s):
                    break
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:  # busy or closing: the next write tries again
                    self._written.set()
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # leave a short WAL behind
        finally:
            db.close()


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


class _AskFailed(Exception):
    """An ask's own code (its ``unit_size``) raised before the ask wrote anything."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements; a trigger's body holds ``;`` of its own."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            if statement.strip():
                yield statement
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete statement at the end of a migration: {statement!r}")
