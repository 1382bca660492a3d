"""SQLite backend of :class:`~idlefleet.coordinator.store.base.Store` (the embedded default).

One database file in the data directory, WAL journal, ``synchronous=FULL`` so that whatever a
call has returned survives a crash of the process or the machine. Writers take the database lock
up front (``BEGIN IMMEDIATE``), which serialises leasing between threads and between processes
sharing the file, so no request is ever in two active leases.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from idlefleet.coordinator.store.base import (
    BatchRecord,
    CommitOutcome,
    FileRecord,
    Lease,
    LeasedItem,
    NewRequest,
    PolicyRecord,
    RequestCounts,
    RequestResult,
    Store,
    StoredRequest,
    VehicleRecord,
)
from idlefleet.coordinator.store.migrations import MIGRATIONS

FILE_CHUNK_BYTES = 4 * 1024 * 1024

_BATCH_COLUMNS = (
    "id, input_file_id, endpoint, completion_window, status, created_at, expires_at, metadata, "
    "errors, output_file_id, error_file_id, in_progress_at, finalizing_at, completed_at, "
    "failed_at, expired_at, cancelling_at, cancelled_at, purpose, data_region"
)
_BATCH_FIELDS = tuple(name.strip() for name in _BATCH_COLUMNS.split(","))
_UPDATABLE_BATCH_FIELDS = frozenset(
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


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._enable_wal()
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

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
                for statement in migration.sql.split(";"):
                    if statement.strip():
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
        with self._lock:
            self._db.close()

    # -- files ---------------------------------------------------------------------------------
    def put_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.purpose,
                    record.filename,
                    record.bytes,
                    record.created_at,
                    record.status,
                ),
            )
            for part, chunk in enumerate(_rechunk(chunks, FILE_CHUNK_BYTES)):
                db.execute("INSERT INTO file_chunks VALUES (?, ?, ?)", (record.id, part, chunk))

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, purpose, filename, bytes, created_at, status FROM files WHERE id = ?",
                (file_id,),
            ).fetchone()
        return FileRecord(*row) if row else None

    def read_file(self, file_id: str) -> Iterator[bytes]:
        with self._lock:
            if self.get_file(file_id) is None:
                raise KeyError(file_id)
            (parts,) = self._db.execute(
                "SELECT COUNT(*) FROM file_chunks WHERE file_id = ?", (file_id,)
            ).fetchone()
        return self._chunks(file_id, parts)

    def _chunks(self, file_id: str, parts: int) -> Iterator[bytes]:
        # Chunk by chunk, so a large file streams; a file deleted meanwhile is an error, never
        # a silently shorter file.
        for part in range(parts):
            with self._lock:
                row = self._db.execute(
                    "SELECT data FROM file_chunks WHERE file_id = ? AND part = ?", (file_id, part)
                ).fetchone()
            if row is None:
                raise KeyError(file_id)
            yield bytes(row[0])

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM file_chunks WHERE file_id = ?", (file_id,))
            return db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # -- batches -------------------------------------------------------------------------------
    def create_batch(self, batch: BatchRecord) -> None:
        with self._write() as db:
            (seq_no,) = db.execute("SELECT COALESCE(MAX(seq_no), 0) + 1 FROM batches").fetchone()
            db.execute(
                f"INSERT INTO batches ({_BATCH_COLUMNS}, seq_no) "
                f"VALUES ({', '.join('?' * (len(_BATCH_FIELDS) + 1))})",
                (
                    batch.id,
                    batch.input_file_id,
                    batch.endpoint,
                    batch.completion_window,
                    batch.status,
                    batch.created_at,
                    batch.expires_at,
                    _dump(batch.metadata),
                    _dump(batch.errors),
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
                    seq_no,
                ),
            )

    def _batch_from_row(self, row: tuple[Any, ...]) -> BatchRecord:
        fields = dict(zip(_BATCH_FIELDS, row, strict=True))
        fields["metadata"] = _load(fields["metadata"])
        fields["errors"] = _load(fields["errors"])
        return BatchRecord(**fields, request_counts=self._counts(fields["id"]))

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            return self._batch_from_row(row) if row else None

    def list_batches(self, limit: int, after: str | None = None) -> list[BatchRecord]:
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY seq_no DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE seq_no < "
                    "(SELECT seq_no FROM batches WHERE id = ?) ORDER BY seq_no DESC LIMIT ?",
                    (after, limit),
                ).fetchall()
            return [self._batch_from_row(row) for row in rows]

    def batches_with_status(self, statuses: Collection[str]) -> list[BatchRecord]:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY seq_no",
                tuple(statuses),
            ).fetchall()
            return [self._batch_from_row(row) for row in rows]

    def update_batch(
        self, batch_id: str, expect_status: Collection[str], **changes: Any
    ) -> BatchRecord | None:
        unknown = set(changes) - _UPDATABLE_BATCH_FIELDS
        if unknown:
            raise ValueError(f"cannot update batch fields {sorted(unknown)}")
        if not changes:
            raise ValueError("update_batch needs at least one change")
        if "errors" in changes:
            changes["errors"] = _dump(changes["errors"])
        assignments = ", ".join(f"{name} = ?" for name in changes)
        marks = ",".join("?" * len(expect_status))
        with self._write() as db:
            updated = db.execute(
                f"UPDATE batches SET {assignments} WHERE id = ? AND status IN ({marks})",
                (*changes.values(), batch_id, *expect_status),
            ).rowcount
            # Read back inside the transaction: the record is this update's, not a later one's.
            return self.get_batch(batch_id) if updated else None

    # -- requests and leases -------------------------------------------------------------------
    def add_requests(self, batch_id: str, requests: Iterable[NewRequest]) -> int:
        rows = [
            (
                batch_id,
                r.seq,
                r.custom_id,
                r.model,
                r.encoding_format,
                json.dumps(list(r.texts), ensure_ascii=False),
                sum(len(t) for t in r.texts),
                "pending" if r.error_status is None else "failed",
                r.error_status,
                _dump(r.error_body),
            )
            for r in requests
        ]
        with self._write() as db:
            db.executemany(
                "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
                "sort_key, state, error_status, error_body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def _counts(self, batch_id: str) -> RequestCounts:
        by_state = dict(
            self._db.execute(
                "SELECT state, COUNT(*) FROM requests WHERE batch_id = ? GROUP BY state",
                (batch_id,),
            ).fetchall()
        )
        return RequestCounts(
            total=sum(by_state.values()),
            completed=by_state.get("done", 0),
            failed=by_state.get("failed", 0),
            pending=by_state.get("pending", 0),
            leased=by_state.get("leased", 0),
        )

    def request_counts(self, batch_id: str) -> RequestCounts:
        with self._lock:
            return self._counts(batch_id)

    def request_formats(self, batch_id: str, seqs: Collection[int]) -> dict[int, tuple[str, str]]:
        marks = ",".join("?" * len(seqs))
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, model, encoding_format FROM requests "
                f"WHERE batch_id = ? AND seq IN ({marks})",
                (batch_id, *seqs),
            ).fetchall()
        return {seq: (model, fmt) for seq, model, fmt in rows}

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
        models, purposes, data_regions = list(models), list(purposes), list(data_regions)
        if not (models and purposes and data_regions):
            return None  # nothing allowed (and ``IN ()`` is not SQL everywhere)
        model_marks = ",".join("?" * len(models))
        purpose_marks = ",".join("?" * len(purposes))
        region_marks = ",".join("?" * len(data_regions))
        with self._write() as db:
            row = db.execute(
                "SELECT b.id, b.purpose, b.data_region FROM batches b "
                f"WHERE b.status = 'in_progress' AND b.purpose IN ({purpose_marks}) "
                f"AND b.data_region IN ({region_marks}) AND EXISTS ("
                "SELECT 1 FROM requests r WHERE r.batch_id = b.id AND r.state = 'pending' "
                f"AND r.model IN ({model_marks})) ORDER BY b.seq_no LIMIT 1",
                (*purposes, *data_regions, *models),
            ).fetchone()
            if row is None:
                return None
            batch_id, purpose, data_region = row
            (pending,) = db.execute(
                "SELECT COUNT(*) FROM requests WHERE batch_id = ? AND state = 'pending'",
                (batch_id,),
            ).fetchone()
            size = max(1, unit_size(pending))
            picked = db.execute(
                "SELECT seq, custom_id, texts, model FROM requests "
                f"WHERE batch_id = ? AND state = 'pending' AND model IN ({model_marks}) "
                "ORDER BY sort_key DESC, seq LIMIT ?",
                (batch_id, *models, size),
            ).fetchall()
            # One lease carries one model: keep the picked requests of the first one's model.
            model = picked[0][3]
            picked = [p for p in picked if p[3] == model]
            seqs = [p[0] for p in picked]
            db.executemany(
                "UPDATE requests SET state = 'leased', lease_id = ?, attempts = attempts + 1 "
                "WHERE batch_id = ? AND seq = ?",
                [(lease_id, batch_id, seq) for seq in seqs],
            )
            deadline = now + lease_seconds
            db.execute(
                "INSERT INTO leases (id, batch_id, vehicle_id, model, seqs, created_at, "
                "deadline, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'active')",
                (lease_id, batch_id, vehicle_id, model, json.dumps(seqs), now, deadline),
            )
        items = tuple(LeasedItem(p[0], p[1], tuple(json.loads(p[2]))) for p in picked)
        return Lease(
            lease_id,
            batch_id,
            vehicle_id,
            model,
            deadline,
            items,
            purpose=purpose,
            data_region=data_region,
        )

    def commit_results(
        self,
        vehicle_id: str,
        lease_id: str,
        results: Iterable[RequestResult],
        now: float,
        lease_seconds: float,
        energy_j: float = 0.0,
    ) -> CommitOutcome:
        _check_energy(energy_j)
        results = list(results)
        with self._write() as db:
            lease = db.execute(
                "SELECT batch_id, seqs, state, deadline FROM leases "
                "WHERE id = ? AND vehicle_id = ?",
                (lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return CommitOutcome(0, 0, False, None, unknown_lease=True)
            batch_id, seqs_json, state, deadline = lease
            if energy_j:
                db.execute(
                    "UPDATE leases SET energy_j = energy_j + ? WHERE id = ?", (energy_j, lease_id)
                )
            leased = set(json.loads(seqs_json))
            mine = [r for r in results if r.seq in leased]
            committed = 0
            # A late answer may finish requests another car's lease holds now: remember those
            # leases so they can close once nothing in them is left open.
            other_leases: set[str] = set()
            for r in mine:
                holder = db.execute(
                    "SELECT lease_id FROM requests WHERE batch_id = ? AND seq = ? "
                    "AND state = 'leased'",
                    (batch_id, r.seq),
                ).fetchone()
                done = db.execute(
                    "UPDATE requests SET state = 'done', vectors = ?, dim = ?, token_count = ?, "
                    "body = ?, vehicle_id = ?, lease_id = ?, finished_at = ? "
                    "WHERE batch_id = ? AND seq = ? AND state IN ('pending', 'leased')",
                    (
                        r.vectors,
                        r.dim,
                        r.token_count,
                        r.body,
                        vehicle_id,
                        lease_id,
                        now,
                        batch_id,
                        r.seq,
                    ),
                ).rowcount
                committed += done
                if done and holder and holder[0] != lease_id:
                    other_leases.add(holder[0])
            for other in other_leases:
                self._close_if_finished(db, other)
            active = state == "active"
            finished = False
            if active:
                deadline = now + lease_seconds
                db.execute("UPDATE leases SET deadline = ? WHERE id = ?", (deadline, lease_id))
                finished = self._close_if_finished(db, lease_id)
        return CommitOutcome(
            committed,
            len(mine) - committed,
            active,
            deadline if active else None,
            lease_finished=finished,
        )

    @staticmethod
    def _close_if_finished(db: sqlite3.Connection, lease_id: str) -> bool:
        (open_items,) = db.execute(
            "SELECT COUNT(*) FROM requests WHERE lease_id = ? AND state = 'leased'", (lease_id,)
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

    def get_lease(self, vehicle_id: str, lease_id: str) -> Lease | None:
        found = self._leases("WHERE l.id = ? AND l.vehicle_id = ?", (lease_id, vehicle_id))
        return found[0] if found else None

    def list_leases(self, active_only: bool = True, limit: int = 1000) -> list[Lease]:
        where = "WHERE l.state = 'active'" if active_only else ""
        return self._leases(f"{where} ORDER BY l.created_at DESC LIMIT ?", (limit,))

    def _leases(self, tail: str, args: tuple[Any, ...]) -> list[Lease]:
        # Purpose and region are the batch's (fixed at creation), so they are read from it.
        with self._lock:
            rows = self._db.execute(
                "SELECT l.id, l.batch_id, l.vehicle_id, l.model, l.deadline, l.state, "
                "b.purpose, b.data_region, l.energy_j, l.end_reason "
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
                r[5],
                purpose=r[6],
                data_region=r[7],
                energy_j=r[8],
                end_reason=r[9],
            )
            for r in rows
        ]

    def return_requests(self, vehicle_id: str, lease_id: str, seqs: Collection[int]) -> int:
        with self._write() as db:
            lease = db.execute(
                "SELECT batch_id FROM leases WHERE id = ? AND vehicle_id = ? AND state = 'active'",
                (lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return 0
            returned = 0
            for seq in seqs:
                returned += db.execute(
                    "UPDATE requests SET state = 'pending', lease_id = NULL "
                    "WHERE batch_id = ? AND seq = ? AND lease_id = ? AND state = 'leased'",
                    (lease[0], seq, lease_id),
                ).rowcount
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
        _check_energy(energy_j)
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
            return db.execute(
                "UPDATE requests SET state = 'pending', lease_id = NULL "
                "WHERE lease_id = ? AND state = 'leased'",
                (lease_id,),
            ).rowcount

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
                returned += db.execute(
                    "UPDATE requests SET state = 'pending', lease_id = NULL "
                    "WHERE lease_id = ? AND state = 'leased'",
                    (lease_id,),
                ).rowcount
        return returned

    def active_lease_count(self, batch_id: str) -> int:
        with self._lock:
            (n,) = self._db.execute(
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
                (status, _dump(error_body), batch_id),
            ).rowcount

    def iter_requests(self, batch_id: str) -> Iterator[StoredRequest]:
        last = -1
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT seq, custom_id, state, encoding_format, model, vectors, dim, "
                    "token_count, error_status, error_body, body FROM requests "
                    "WHERE batch_id = ? AND seq > ? ORDER BY seq LIMIT 1000",
                    (batch_id, last),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                values = list(row)
                values[5] = bytes(values[5]) if values[5] is not None else None
                values[9] = _load(values[9])
                values[10] = bytes(values[10]) if values[10] is not None else None
                yield StoredRequest(*values)
            last = rows[-1][0]

    def vehicle_usage(self, batch_id: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT vehicle_id, COUNT(*) FROM requests WHERE batch_id = ? AND state = 'done' "
                "GROUP BY vehicle_id",
                (batch_id,),
            ).fetchall()
        return {vid: n for vid, n in rows}

    # -- vehicles ------------------------------------------------------------------------------
    def upsert_vehicle(self, record: VehicleRecord) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO vehicles (id, hardware, models, registered_at, last_seen, status, "
                "status_reason) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "hardware = excluded.hardware, models = excluded.models, "
                "last_seen = excluded.last_seen, status = excluded.status, "
                "status_reason = excluded.status_reason",
                (
                    record.id,
                    json.dumps(record.hardware),
                    json.dumps(list(record.models)),
                    record.registered_at,
                    record.last_seen,
                    record.status,
                    record.status_reason,
                ),
            )

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
        with self._lock:
            rows = self._db.execute(
                "SELECT v.id, v.hardware, v.models, v.registered_at, v.last_seen, v.status, "
                "(SELECT COUNT(*) FROM requests r WHERE r.vehicle_id = v.id AND r.state = 'done'), "
                "v.status_reason "
                f"FROM vehicles v {where} ORDER BY v.id",
                args,
            ).fetchall()
        return [
            VehicleRecord(
                id=r[0],
                hardware=json.loads(r[1]),
                models=tuple(json.loads(r[2])),
                registered_at=r[3],
                last_seen=r[4],
                status=r[5],
                completed_requests=r[6],
                status_reason=r[7],
            )
            for r in rows
        ]

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
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = ? "
                "ORDER BY version DESC LIMIT 1",
                (vehicle_id,),
            ).fetchone()
        return PolicyRecord(*row) if row else None

    def policy_history(self, vehicle_id: str, limit: int = 1000) -> list[PolicyRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = ? "
                "ORDER BY version DESC LIMIT ?",
                (vehicle_id, limit),
            ).fetchall()
        return [PolicyRecord(*row) for row in reversed(rows)]


def _check_energy(energy_j: float) -> None:
    if not (math.isfinite(energy_j) and energy_j >= 0):
        raise ValueError(f"energy_j must be a finite number >= 0, got {energy_j!r}")


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup arbitrary chunks into pieces of ``size`` bytes (the last may be shorter)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)
