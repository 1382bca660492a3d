"""PostgreSQL backend of :class:`~idlefleet.coordinator.store.base.Store` (scale-out).

Coordinator replicas share one database through this backend, each with its own pool of
connections (psycopg 3 and psycopg_pool). Every method is one transaction at READ COMMITTED;
where replicas race, row locks decide: leasing takes its requests with ``FOR UPDATE SKIP
LOCKED``, so replicas never hand out a request twice and never wait for each other's units;
whatever ends, extends or finishes a lease locks the lease's row before any of its requests,
so such changes to one lease take turns and commits do not deadlock each other; policy
appends take turns per vehicle on an advisory lock. The one row replicas can still wait on is
a batch's request counter (migration 3): each session adds into shard ``pg_backend_pid() % 16``,
so two sessions of one shard wait for each other's commit there. Connection-level failures (a
server restarting, a lost connection) become :class:`StoreUnavailable`; a pooled connection
that died while idle is found by the ``BEGIN`` that starts every write, or by the read itself,
and replaced before anything of the call took effect, so the first call after the server is
back succeeds.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import astuple
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg import errors, sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

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
    StoreUnavailable,
    VehicleLiveness,
    VehicleRecord,
    VehicleSeen,
)
from idlefleet.coordinator.store.identity_sql import IdentitySql
from idlefleet.coordinator.store.ledger_sql import LedgerSql
from idlefleet.coordinator.store.migrations import MIGRATIONS
from idlefleet.coordinator.store.overview_sql import OverviewSql
from idlefleet.coordinator.store.postgres_sql import (
    BATCH_SELECT,
    CHOOSE_BATCH_SQL,
    CLOSE_IF_FINISHED_SQL,
    COMMIT_RESULTS_SQL,
    FIND_LEASE_SQL,
    LEASE_SEQS,
    PICK_UNIT_SQL,
    RECORD_PROGRESS_SQL,
    REQUEUE_SQL,
)
from idlefleet.coordinator.store.retention_sql import RetentionSql
from idlefleet.coordinator.store.sql_common import (
    ATTEMPTS_EXHAUSTED_STATUS,
    BATCH_COLUMNS,
    BATCH_FIELDS,
    FILE_CHUNK_BYTES,
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
)
from idlefleet.coordinator.store.verification_sql import VerificationSql

Conn = psycopg.Connection[TupleRow]
T = TypeVar("T")

_PAGE = 1000
"""Requests per query of ``iter_requests``."""

_DEADLOCK_RETRIES = 3
"""Whole-call retries after a deadlock or serialisation failure (nothing of it took effect)."""


class PostgresStore(IdentitySql, VerificationSql, LedgerSql, OverviewSql, RetentionSql, Store):
    """The store in a PostgreSQL database, through a pool of ``min_size``..``max_size`` sessions.

    ``conninfo`` is a libpq URL or key=value string, passed to psycopg as it is (so
    ``options=-csearch_path%3Dmyschema`` puts the store's tables in ``myschema``). ``timeout``
    bounds how long a call waits for a connection (all in use, or the server unreachable)
    before it raises :class:`StoreUnavailable`. Migrations run when the store opens.
    """

    def __init__(
        self, conninfo: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0
    ) -> None:
        self._max_size = max_size
        self._migrate(conninfo, timeout)
        # reconnect_timeout=0: the pool gives up a failed reconnection at once instead of
        # retrying on a back-off schedule (1 s, 2 s, 4 s, ...), and the next call that finds
        # no idle connection opens a new one immediately, so the first call after the server
        # is back does not wait for the next tick of that schedule.
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            timeout=timeout,
            reconnect_timeout=0.0,
            name="idlefleet-store",
            open=False,
        )
        self._pool.open(wait=False)

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def _migrate(conninfo: str, timeout: float) -> None:
        # On a connection of its own, so that a bad URL or an unreachable server is reported
        # with the driver's own message rather than as a pool timeout.
        try:
            conn = psycopg.connect(
                conninfo, autocommit=True, connect_timeout=max(2, math.ceil(timeout))
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(str(exc).strip()) from exc
        try:
            with conn.transaction():
                # Per schema: two replicas starting at once on a fresh database take turns,
                # and the second finds every migration done.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('idlefleet.migrations'), "
                    "hashtext(current_schema()))"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
                )
                done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
                for migration in MIGRATIONS:
                    if migration.version in done:
                        continue
                    conn.execute(migration.sql("postgresql"))
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                        (migration.version, migration.name, time.time()),
                    )
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(str(exc).strip()) from exc
        finally:
            conn.close()

    def _run(self, work: Callable[[Conn], T], *, write: bool, replayable: bool = True) -> T:
        """Run ``work`` on a pooled connection; in one transaction if ``write``.

        A write starts with ``BEGIN``, a round trip that proves the connection alive before
        anything of the call is sent: a connection that died in the pool (the server
        restarted) fails there, is thrown away by the pool, and the call moves to the next
        one. Reads are single statements and change nothing, so they are simply repeated on
        another connection. A deadlock undoes the whole transaction, which is then repeated if
        ``work`` can run again (its inputs are not a consumed iterator). Any other
        connection-level failure is :class:`StoreUnavailable`.
        """
        stale = deadlocks = 0
        while True:
            try:
                conn = self._pool.getconn()
            except psycopg.OperationalError as exc:  # PoolTimeout, PoolClosed
                raise StoreUnavailable(str(exc).strip()) from exc
            stage = "begin" if write else "read"
            try:
                if not write:
                    return work(conn)
                with conn.transaction():
                    stage = "work"
                    result = work(conn)
                    stage = "commit"
                return result
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                deadlocks += 1
                if replayable and deadlocks <= _DEADLOCK_RETRIES and not conn.broken:
                    continue
                raise StoreUnavailable(str(exc).strip()) from exc
            except psycopg.OperationalError as exc:
                if stage in ("begin", "read") and conn.broken and stale < self._max_size:
                    stale += 1
                    continue
                message = str(exc).strip()
                if stage == "commit":
                    # PostgreSQL cannot tell a client whose connection dropped during COMMIT
                    # whether it committed; say so rather than promise that nothing happened.
                    message += " (connection lost during COMMIT: the call may have taken effect)"
                raise StoreUnavailable(message) from exc
            finally:
                self._pool.putconn(conn)

    _mark = "%s"
    _unique_violation = errors.UniqueViolation

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        return self._run(work, write=write)

    def _read(
        self, query: str, params: Sequence[Any] | dict[str, Any] = (), *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        return self._run(
            lambda conn: conn.execute(query, params, binary=binary).fetchall(), write=False
        )

    def schema_version(self) -> int:
        ((version,),) = self._read("SELECT MAX(version) FROM schema_migrations")
        return int(version or 0)

    def close(self) -> None:
        self._pool.close()

    # -- files ---------------------------------------------------------------------------------
    def put_file(self, record: FileRecord, chunks: Iterable[bytes]) -> None:
        def work(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO files (id, purpose, filename, bytes, created_at, status, batch_id, "
                "principal) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                astuple(record),  # the record's fields are the columns, in order
            )
            for part, chunk in enumerate(rechunk(chunks, FILE_CHUNK_BYTES)):
                conn.execute(
                    "INSERT INTO file_chunks VALUES (%s, %s, %s)", (record.id, part, chunk)
                )

        # The chunks are an iterator consumed by the first attempt: never replayed.
        self._run(work, write=True, replayable=False)

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._read(
            "SELECT id, purpose, filename, bytes, created_at, status, batch_id, principal "
            "FROM files "
            "WHERE id = %s",
            (file_id,),
        )
        return FileRecord(*rows[0]) if rows else None

    def read_file(self, file_id: str) -> Iterator[bytes]:
        rows = self._read(
            "SELECT (SELECT count(*) FROM file_chunks c WHERE c.file_id = f.id) FROM files f "
            "WHERE f.id = %s",
            (file_id,),
        )
        if not rows:
            raise KeyError(file_id)
        return self._chunks(file_id, int(rows[0][0]))

    def _chunks(self, file_id: str, parts: int) -> Iterator[bytes]:
        # Chunk by chunk, each its own query, so a large file streams without holding a
        # connection between chunks; a file deleted meanwhile is an error, never a silently
        # shorter file.
        for part in range(parts):
            rows = self._read(
                "SELECT data FROM file_chunks WHERE file_id = %s AND part = %s",
                (file_id, part),
                binary=True,
            )
            if not rows:
                raise KeyError(file_id)
            yield bytes(rows[0][0])

    def batch_files(self, batch_id: str) -> list[FileRecord]:
        rows = self._read(
            "SELECT id, purpose, filename, bytes, created_at, status, batch_id, principal "
            "FROM files "
            "WHERE batch_id = %s ORDER BY id",
            (batch_id,),
        )
        return [FileRecord(*row) for row in rows]

    def delete_file(self, file_id: str) -> bool:
        # file_chunks go with the file (ON DELETE CASCADE).
        return self._run(
            lambda conn: conn.execute("DELETE FROM files WHERE id = %s", (file_id,)).rowcount > 0,
            write=True,
        )

    # -- batches -------------------------------------------------------------------------------
    def create_batch(self, batch: BatchRecord) -> None:
        values = [
            dump_json(value) if name in ("metadata", "errors") else value
            for name, value in ((name, getattr(batch, name)) for name in BATCH_FIELDS)
        ]
        self._run(
            lambda conn: conn.execute(
                f"INSERT INTO batches ({BATCH_COLUMNS}, seq_no) "
                f"VALUES ({', '.join(['%s'] * len(BATCH_FIELDS))}, nextval('batches_seq_no'))",
                values,
            ),
            write=True,
        )

    @staticmethod
    def _batch_from_row(row: tuple[Any, ...]) -> BatchRecord:
        fields = dict(zip(BATCH_FIELDS, row[: len(BATCH_FIELDS)], strict=True))
        fields["metadata"] = load_json(fields["metadata"])
        fields["errors"] = load_json(fields["errors"])
        return BatchRecord(**fields, request_counts=_counts(*row[len(BATCH_FIELDS) :]))

    def _batches(self, tail: str, params: Sequence[Any]) -> list[BatchRecord]:
        return [self._batch_from_row(row) for row in self._read(f"{BATCH_SELECT} {tail}", params)]

    @classmethod
    def _get_batch(cls, conn: Conn, batch_id: str) -> BatchRecord | None:
        row = conn.execute(f"{BATCH_SELECT} WHERE b.id = %s", (batch_id,)).fetchone()
        return cls._batch_from_row(row) if row else None

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        return self._run(lambda conn: self._get_batch(conn, batch_id), write=False)

    def list_batches(
        self, limit: int, after: str | None = None, principal: str | None = None
    ) -> list[BatchRecord]:
        where, args = list_batches_filter(after, principal, "%s", column_prefix="b.")
        return self._batches(f"{where} ORDER BY b.seq_no DESC LIMIT %s", (*args, limit))

    def batches_with_status(self, statuses: Collection[str]) -> list[BatchRecord]:
        return self._batches(
            "WHERE b.status = ANY(%s::text[]) ORDER BY b.seq_no", (list(statuses),)
        )

    def update_batch(
        self, batch_id: str, expect_status: Collection[str], **changes: Any
    ) -> BatchRecord | None:
        check_batch_changes(changes)
        return self._run(
            lambda conn: self._update_batch(
                conn, batch_id, expect_status, sql.SQL(""), (), changes
            ),
            write=True,
        )

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
        condition = sql.SQL(" AND (claim_owner IS NULL OR claim_owner = %s OR claim_until < %s)")
        return self._run(
            lambda conn: self._update_batch(
                conn, batch_id, expect_status, condition, (owner, now), changes
            ),
            write=True,
        )

    def finish_batch(
        self, batch_id: str, expect_status: Collection[str], owner: str, **changes: Any
    ) -> BatchRecord | None:
        check_batch_changes(changes, allow_none=True)
        changes = {**changes, "claim_owner": None, "claim_until": None}

        def work(conn: Conn) -> BatchRecord | None:
            finished = self._update_batch(
                conn, batch_id, expect_status, sql.SQL(" AND claim_owner = %s"), (owner,), changes
            )
            if finished is None:  # the status moved on (a cancel): let the claim go anyway
                conn.execute(
                    "UPDATE batches SET claim_owner = NULL, claim_until = NULL "
                    "WHERE id = %s AND claim_owner = %s",
                    (batch_id, owner),
                )
                return None
            keep = [f for f in (finished.output_file_id, finished.error_file_id) if f]
            conn.execute(
                "DELETE FROM files WHERE batch_id = %s AND id <> ALL(%s::text[])",
                (batch_id, keep),
            )
            return finished

        return self._run(work, write=True)

    def _update_batch(
        self,
        conn: Conn,
        batch_id: str,
        expect_status: Collection[str],
        condition: sql.SQL,
        condition_args: tuple[Any, ...],
        changes: dict[str, Any],
    ) -> BatchRecord | None:
        if "errors" in changes:
            changes["errors"] = dump_json(changes["errors"])
        # The names come from check_batch_changes' allow-list (plus the claim columns).
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(name)) for name in changes
        )
        query = sql.SQL(
            "UPDATE batches SET {} WHERE id = %s AND status = ANY(%s::text[]){}"
        ).format(assignments, condition)
        updated = conn.execute(
            query, (*changes.values(), batch_id, list(expect_status), *condition_args)
        ).rowcount
        # Read back inside the transaction: the record is this update's, not a later one's.
        return self._get_batch(conn, batch_id) if updated else None

    # -- requests and leases -------------------------------------------------------------------
    def add_requests(self, batch_id: str, requests: Iterable[NewRequest]) -> int:
        rows, failed = request_rows(batch_id, requests)

        def work(conn: Conn) -> None:
            with conn.cursor().copy(f"COPY requests ({REQUEST_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            # The trigger counts changes of state from here on; new rows are counted once, here.
            conn.execute(
                "INSERT INTO batch_counts (batch_id, shard, pending, failed) "
                "VALUES (%s, 0, %s, %s) ON CONFLICT (batch_id, shard) DO UPDATE SET "
                "pending = batch_counts.pending + EXCLUDED.pending, "
                "failed = batch_counts.failed + EXCLUDED.failed",
                (batch_id, len(rows) - failed, failed),
            )

        self._run(work, write=True)
        return len(rows)

    def request_counts(self, batch_id: str) -> RequestCounts:
        ((pending, leased, done, failed),) = self._read(
            "SELECT COALESCE(SUM(pending), 0)::bigint, COALESCE(SUM(leased), 0)::bigint, "
            "COALESCE(SUM(done), 0)::bigint, COALESCE(SUM(failed), 0)::bigint "
            "FROM batch_counts WHERE batch_id = %s",
            (batch_id,),
        )
        return _counts(pending, leased, done, failed)

    def request_payloads(self, batch_id: str, seqs: Collection[int]) -> dict[int, Any]:
        if not seqs:
            return {}
        rows = self._read(
            "SELECT seq, payload FROM requests "
            "WHERE batch_id = %s AND seq = ANY(%s::bigint[]) AND payload <> %s",
            (batch_id, sorted(seqs), NO_PAYLOAD),
        )
        return {seq: json.loads(payload) for seq, payload in rows}

    def lease_units(
        self, asks: Sequence[LeaseAsk], now: float, lease_seconds: float
    ) -> list[Lease | Exception | None]:
        return self._run(lambda conn: self._lease_all(conn, asks, now, lease_seconds), write=True)

    def commit_and_lease(
        self,
        commits: Sequence[ResultCommit],
        asks: Sequence[LeaseAsk],
        now: float,
        lease_seconds: float,
    ) -> tuple[list[CommitOutcome | Exception], list[Lease | Exception | None]]:
        def work(
            conn: Conn,
        ) -> tuple[list[CommitOutcome | Exception], list[Lease | Exception | None]]:
            outcomes = self._commit_all(conn, commits, now, lease_seconds)
            return outcomes, self._lease_all(conn, asks, now, lease_seconds)

        return self._run(work, write=True)

    def _lease_all(
        self, conn: Conn, asks: Sequence[LeaseAsk], now: float, lease_seconds: float
    ) -> list[Lease | Exception | None]:
        # Within one call this transaction only takes work away: the batch chosen for a kind
        # of ask stays the right one until it runs dry for it, a kind that found nothing finds
        # nothing again, and a batch's pending count falls by what we take (other replicas'
        # leases make it a little high, which is fine for sizing). So a batch is chosen once
        # per kind of ask, and every further ask of that kind costs one round trip, its pick.
        chosen: dict[tuple[Any, ...], _Chosen | None] = {}
        pending: dict[str, int] = {}
        outcomes: list[Lease | Exception | None] = []
        for ask in asks:
            try:
                outcomes.append(self._lease_one(conn, ask, now, lease_seconds, chosen, pending))
            except _AskFailed as failed:  # raised before this ask wrote anything
                outcomes.append(failed.cause)
        return outcomes

    @staticmethod
    def _lease_one(
        conn: Conn,
        ask: LeaseAsk,
        now: float,
        lease_seconds: float,
        chosen: dict[tuple[Any, ...], _Chosen | None],
        pending: dict[str, int],
    ) -> Lease | None:
        if not (ask.models and ask.purposes and ask.data_regions):
            return None  # nothing allowed
        key = (ask.models, ask.purposes, ask.data_regions)
        models = list(ask.models)
        skip: list[str] = []  # batches found empty for this kind of ask in this call
        while True:
            if key not in chosen:
                row = conn.execute(
                    CHOOSE_BATCH_SQL,
                    {
                        "purposes": list(ask.purposes),
                        "regions": list(ask.data_regions),
                        "skip": skip,
                        "models": models,
                    },
                ).fetchone()
                chosen[key] = None if row is None else _Chosen(*row[:4])
                if row is not None:
                    pending.setdefault(row[0], int(row[4]))
            found = chosen[key]
            if found is None:
                return None
            try:
                size = max(1, ask.unit_size(pending[found.batch_id]))
            except Exception as exc:
                raise _AskFailed(exc) from exc
            deadline = now + lease_seconds
            picked = conn.execute(
                PICK_UNIT_SQL,
                {
                    "batch": found.batch_id,
                    "models": models,
                    "size": size,
                    "max_bytes": ask.max_bytes,
                    "lease": ask.lease_id,
                    "vehicle": ask.vehicle_id,
                    "now": now,
                    "deadline": deadline,
                },
            ).fetchall()
            if picked:
                break
            # The batch ran dry for these models, or every pending request of it is being
            # leased or committed by another transaction right now (SKIP LOCKED passed them
            # over): choose again among the others.
            del chosen[key]
            skip.append(found.batch_id)
        pending[found.batch_id] -= len(picked)
        items = tuple(LeasedItem(p[0], p[1], json.loads(p[2]), p[4]) for p in picked)
        return Lease(
            ask.lease_id,
            found.batch_id,
            ask.vehicle_id,
            picked[0][3],
            deadline,
            items,
            endpoint=found.endpoint,
            purpose=found.purpose,
            data_region=found.data_region,
        )

    def commit_many(
        self, commits: Sequence[ResultCommit], now: float, lease_seconds: float
    ) -> list[CommitOutcome | Exception]:
        return self._run(
            lambda conn: self._commit_all(conn, commits, now, lease_seconds), write=True
        )

    def _commit_all(
        self, conn: Conn, commits: Sequence[ResultCommit], now: float, lease_seconds: float
    ) -> list[CommitOutcome | Exception]:
        outcomes: list[CommitOutcome | Exception] = []
        completed: Counter[str] = Counter()
        for chunk in commits:
            try:
                check_energy(chunk.energy_j)
            except ValueError as exc:  # refused before anything was written
                outcomes.append(exc)
                continue
            outcome = self._commit_one(conn, chunk, now, lease_seconds)
            completed[chunk.vehicle_id] += outcome.committed
            outcomes.append(outcome)
        # Each vehicle's count of completed requests, once per call and last, in id order: a
        # commit never holds one car's row while it waits for another's, which a liveness
        # flush (also in id order) might hold.
        ids = sorted(vid for vid, n in completed.items() if n)
        if ids:
            conn.execute(
                "UPDATE vehicles v SET completed = v.completed + d.n "
                "FROM unnest(%s::text[], %s::bigint[]) AS d(id, n) WHERE v.id = d.id",
                (ids, [completed[vid] for vid in ids]),
            )
        return outcomes

    def _commit_one(
        self, conn: Conn, chunk: ResultCommit, now: float, lease_seconds: float
    ) -> CommitOutcome:
        deadline = now + lease_seconds
        # The first result of a request in the chunk wins; a repeat counts as a duplicate.
        first: dict[int, RequestResult] = {}
        for r in chunk.results:
            first.setdefault(r.seq, r)
        lease = conn.execute(
            FIND_LEASE_SQL,
            {
                "energy": chunk.energy_j,
                "deadline": deadline,
                "lease": chunk.lease_id,
                "vehicle": chunk.vehicle_id,
                "seqs": sorted(first),
            },
        ).fetchone()
        if lease is None:
            return CommitOutcome(0, 0, False, None, unknown_lease=True)
        batch_id, seqs_json, state, holders = lease
        active = state == "active"
        leased = set(json.loads(seqs_json))
        mine = [r for r in chunk.results if r.seq in leased]
        results = [first[seq] for seq in sorted(first) if seq in leased]  # seq order: see SQL
        if not results and not active:
            return CommitOutcome(0, 0, False, None)
        locked = self._lock_leases(conn, holders) if holders else set()
        answer = conn.execute(
            COMMIT_RESULTS_SQL,
            {
                "seqs": [r.seq for r in results],
                "results": [r.result for r in results],
                "tokens": [r.token_count for r in results],
                "batch": batch_id,
                "vehicle": chunk.vehicle_id,
                "lease": chunk.lease_id,
                "lease_seqs": sorted(leased),
            },
        ).fetchone()
        assert answer is not None  # a SELECT without FROM: always one row
        committed, others, finished = answer
        if others:
            # A late answer finished requests other cars' leases hold now: close those that
            # have nothing open left, looking with a fresh snapshot under their row locks. A
            # lease that took one of these requests after the holders were locked above is
            # locked now only if free: waiting for it while holding the requests could
            # deadlock with its owner, whose next commit (or the expiry) closes it instead.
            raced_in = sorted(set(others) - locked)
            if raced_in:
                locked |= self._lock_leases(conn, raced_in, skip_locked=True)
            closable = sorted(locked & set(others))
            if closable:
                conn.execute(CLOSE_IF_FINISHED_SQL, (closable,))
        return CommitOutcome(
            committed,
            len(mine) - committed,
            active,
            deadline if active else None,
            lease_finished=finished,
        )

    @staticmethod
    def _lock_leases(conn: Conn, ids: Iterable[str], *, skip_locked: bool = False) -> set[str]:
        """Lock the active leases among ``ids`` in id order; the ids of those locked."""
        tail = " SKIP LOCKED" if skip_locked else ""
        rows = conn.execute(
            "SELECT id FROM leases WHERE id = ANY(%s::text[]) AND state = 'active' "
            f"ORDER BY id FOR UPDATE{tail}",
            (sorted(ids),),
        ).fetchall()
        return {row[0] for row in rows}

    def get_lease(self, vehicle_id: str, lease_id: str) -> Lease | None:
        found = self._leases("WHERE l.id = %s AND l.vehicle_id = %s", (lease_id, vehicle_id))
        return found[0] if found else None

    def list_leases(self, active_only: bool = True, limit: int = 1000) -> list[Lease]:
        where = "WHERE l.state = 'active'" if active_only else ""
        return self._leases(f"{where} ORDER BY l.created_at DESC LIMIT %s", (limit,))

    def _leases(self, tail: str, args: tuple[Any, ...]) -> list[Lease]:
        # Endpoint, purpose and region are the batch's (fixed at creation): read from it.
        rows = self._read(
            "SELECT l.id, l.batch_id, l.vehicle_id, l.model, l.deadline, b.endpoint, l.state, "
            "b.purpose, b.data_region, l.energy_j, l.end_reason "
            f"FROM leases l JOIN batches b ON b.id = l.batch_id {tail}",
            args,
        )
        return [
            # In the record's own order: the columns above, with no items between deadline
            # and endpoint.
            Lease(r[0], r[1], r[2], r[3], r[4], (), r[5], r[6], r[7], r[8], r[9], r[10])
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
        latest = dict(items)  # the last of a request's records wins
        seqs = sorted(latest)
        deadline = now + lease_seconds
        params = {
            "deadline": deadline,
            "lease": lease_id,
            "vehicle": vehicle_id,
            "seqs": seqs,
            "progress": [latest[seq] for seq in seqs],
        }
        row = self._run(
            lambda conn: conn.execute(RECORD_PROGRESS_SQL, params).fetchone(), write=True
        )
        if row is None:
            return CommitOutcome(0, 0, False, None, unknown_lease=True)
        state, written = row
        if state != "active":
            return CommitOutcome(0, 0, False, None)
        return CommitOutcome(int(written), 0, True, deadline)

    def return_requests(self, vehicle_id: str, lease_id: str, seqs: Collection[int]) -> int:
        def work(conn: Conn) -> int:
            lease = conn.execute(
                "SELECT batch_id FROM leases WHERE id = %s AND vehicle_id = %s "
                "AND state = 'active' FOR UPDATE",
                (lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return 0
            returned = self._requeue(
                conn,
                "WITH ended AS (SELECT id, batch_id, %(seqs)s::bigint[] AS wanted FROM leases "
                "WHERE id = %(lease_id)s) ",
                {"seqs": sorted(seqs), "lease_id": lease_id},
                failed=True,
            )
            conn.execute(CLOSE_IF_FINISHED_SQL, ([lease_id],))
            return returned

        return self._run(work, write=True)

    def release_lease(
        self,
        vehicle_id: str,
        lease_id: str,
        now: float,
        reason: str = "",
        energy_j: float = 0.0,
    ) -> int | None:
        check_energy(energy_j)

        def work(conn: Conn) -> int | None:
            lease = conn.execute(
                "UPDATE leases SET energy_j = energy_j + %s::float8 "
                "WHERE id = %s AND vehicle_id = %s RETURNING state",
                (energy_j, lease_id, vehicle_id),
            ).fetchone()
            if lease is None:
                return None
            if lease[0] != "active":
                return 0
            return self._requeue(
                conn,
                "WITH ended AS (UPDATE leases SET state = 'released', end_reason = %(reason)s "
                f"WHERE id = %(lease_id)s RETURNING id, batch_id, {LEASE_SEQS.format('leases')} "
                "AS wanted) ",
                {"reason": reason or None, "lease_id": lease_id},
                failed=counts_as_failure(reason),
            )

        return self._run(work, write=True)

    def expire_leases(self, now: float) -> int:
        return self._run(
            lambda conn: self._requeue(
                conn,
                "WITH ended AS (UPDATE leases SET state = 'expired' "
                "WHERE state = 'active' AND deadline < %(now)s "
                f"RETURNING id, batch_id, {LEASE_SEQS.format('leases')} AS wanted) ",
                {"now": now},
                failed=True,
            ),
            write=True,
        )

    def _requeue(self, conn: Conn, ended_cte: str, args: dict[str, Any], failed: bool) -> int:
        """Run ``REQUEUE_SQL`` after ``ended_cte``; how many requests went back to the queue."""
        rows = conn.execute(
            ended_cte + REQUEUE_SQL,
            {
                **args,
                "failed": failed,
                "max_attempts": self.max_attempts,
                "error_status": ATTEMPTS_EXHAUSTED_STATUS,
                "error_body": dump_json(attempts_exhausted_body(self.max_attempts)),
            },
        ).fetchall()
        return sum(1 for (state,) in rows if state == "pending")

    def active_lease_count(self, batch_id: str) -> int:
        ((n,),) = self._read(
            "SELECT count(*) FROM leases WHERE batch_id = %s AND state = 'active'", (batch_id,)
        )
        return int(n)

    def abandon_unfinished(self, batch_id: str, status: int, error_body: dict[str, Any]) -> int:
        return self._run(
            lambda conn: (
                conn.execute(
                    "WITH ended AS (UPDATE leases SET state = 'released' "
                    "WHERE batch_id = %s AND state = 'active') "
                    "UPDATE requests SET state = 'failed', error_status = %s, error_body = %s, "
                    "lease_id = NULL WHERE batch_id = %s AND state IN ('pending', 'leased')",
                    (batch_id, status, dump_json(error_body), batch_id),
                ).rowcount
            ),
            write=True,
        )

    def iter_requests(self, batch_id: str) -> Iterator[StoredRequest]:
        last = -1
        while True:
            rows = self._read(
                "SELECT seq, custom_id, state, options, model, result, token_count, "
                "error_status, error_body, vehicle_id FROM requests "
                "WHERE batch_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (batch_id, last, _PAGE),
                binary=True,
            )
            for row in rows:
                values = list(row)
                values[8] = load_json(values[8])
                yield StoredRequest(*values)
            if len(rows) < _PAGE:
                return  # a short page is the last: no round trip to find nothing
            last = rows[-1][0]

    def vehicle_usage(self, batch_id: str) -> dict[str, int]:
        rows = self._read(
            "SELECT vehicle_id, count(*) FROM requests WHERE batch_id = %s AND state = 'done' "
            "GROUP BY vehicle_id",
            (batch_id,),
        )
        return {vid: int(n) for vid, n in rows}

    # -- vehicles ------------------------------------------------------------------------------
    def upsert_vehicles(self, records: Sequence[VehicleRecord]) -> None:
        # One row per vehicle, the last record given winning (as if registered one after the
        # other), in id order so that concurrent registrations lock rows in the same order.
        latest = {r.id: r for r in records}
        ordered = [latest[vid] for vid in sorted(latest)]
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO vehicles (id, hardware, models, registered_at, last_seen, status, "
                "status_reason) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], "
                "%s::float8[], %s::float8[], %s::text[], %s::text[]) "
                "ON CONFLICT (id) DO UPDATE SET hardware = EXCLUDED.hardware, "
                "models = EXCLUDED.models, last_seen = EXCLUDED.last_seen, "
                "status = EXCLUDED.status, status_reason = EXCLUDED.status_reason",
                (
                    [r.id for r in ordered],
                    [json.dumps(r.hardware) for r in ordered],
                    [json.dumps(list(r.models)) for r in ordered],
                    [float(r.registered_at) for r in ordered],
                    [float(r.last_seen) for r in ordered],
                    [r.status for r in ordered],
                    [r.status_reason for r in ordered],
                ),
            ),
            write=True,
        )

    def record_liveness(self, seen: Sequence[VehicleSeen]) -> int:
        # One heartbeat per vehicle, the newest (the later one on a tie), since an UPDATE ...
        # FROM applies an arbitrary one of several matching rows.
        newest: dict[str, VehicleSeen] = {}
        for s in seen:
            if s.vehicle_id not in newest or newest[s.vehicle_id].last_seen <= s.last_seen:
                newest[s.vehicle_id] = s
        ordered = [newest[vid] for vid in sorted(newest)]
        return self._run(
            lambda conn: (
                conn.execute(
                    "UPDATE vehicles v SET last_seen = s.last_seen, status = s.status, "
                    "status_reason = s.reason FROM unnest(%s::text[], %s::float8[], %s::text[], "
                    "%s::text[]) AS s(id, last_seen, status, reason) "
                    "WHERE v.id = s.id AND v.last_seen <= s.last_seen",
                    (
                        [s.vehicle_id for s in ordered],
                        [float(s.last_seen) for s in ordered],
                        [s.status for s in ordered],
                        [s.status_reason for s in ordered],
                    ),
                ).rowcount
            ),
            write=True,
        )

    def count_live_vehicles(self, since: float) -> int:
        ((n,),) = self._read("SELECT count(*) FROM vehicles WHERE last_seen >= %s", (since,))
        return int(n)

    _LIVENESS_COLUMNS = "id, models, last_seen, status, status_reason"

    def live_vehicles(self, since: float) -> list[VehicleLiveness]:
        rows = self._read(
            f"SELECT {self._LIVENESS_COLUMNS} FROM vehicles WHERE last_seen >= %s ORDER BY id",
            (since,),
        )
        return [liveness_from_row(row) for row in rows]

    def vehicle_liveness(self, vehicle_ids: Collection[str]) -> dict[str, VehicleLiveness]:
        rows = self._read(
            f"SELECT {self._LIVENESS_COLUMNS} FROM vehicles WHERE id = ANY(%s::text[])",
            (list(vehicle_ids),),
        )
        return {row[0]: liveness_from_row(row) for row in rows}

    def touch_vehicle(
        self, vehicle_id: str, now: float, status: str, reason: str | None = None
    ) -> bool:
        return self._run(
            lambda conn: (
                conn.execute(
                    "UPDATE vehicles SET last_seen = %s, status = %s, status_reason = %s "
                    "WHERE id = %s",
                    (now, status, reason, vehicle_id),
                ).rowcount
                > 0
            ),
            write=True,
        )

    def _vehicles(self, where: str, args: tuple[Any, ...]) -> list[VehicleRecord]:
        rows = self._read(f"SELECT {VEHICLE_COLUMNS} FROM vehicles v {where} ORDER BY v.id", args)
        return [vehicle_from_row(row) for row in rows]

    def get_vehicle(self, vehicle_id: str) -> VehicleRecord | None:
        found = self._vehicles("WHERE v.id = %s", (vehicle_id,))
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
        def work(conn: Conn) -> PolicyRecord | None:
            # Appends for one vehicle take turns on an advisory lock; the next statement then
            # sees the latest version (a snapshot taken after the lock), so versions are
            # distinct and consecutive and expect_version is a true compare-and-set. The
            # primary key would refuse a duplicate version even without it.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('idlefleet.owner_policies'), hashtext(%s))",
                (vehicle_id,),
            )
            row = conn.execute(
                f"INSERT INTO owner_policies ({self._POLICY_COLUMNS}) "
                "SELECT %(vehicle)s::text, COALESCE(MAX(version), 0) + 1, %(policy)s::text, "
                "%(actor)s::text, %(now)s::float8 FROM owner_policies "
                "WHERE vehicle_id = %(vehicle)s "
                "HAVING %(expect)s::bigint IS NULL OR COALESCE(MAX(version), 0) = %(expect)s "
                "RETURNING version",
                {
                    "vehicle": vehicle_id,
                    "policy": policy_json,
                    "actor": actor,
                    "now": now,
                    "expect": expect_version,
                },
            ).fetchone()
            return (
                None if row is None else PolicyRecord(vehicle_id, row[0], policy_json, actor, now)
            )

        return self._run(work, write=True)

    def current_policy(self, vehicle_id: str) -> PolicyRecord | None:
        rows = self._read(
            f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = %s "
            "ORDER BY version DESC LIMIT 1",
            (vehicle_id,),
        )
        return PolicyRecord(*rows[0]) if rows else None

    def current_policies(self, vehicle_ids: Collection[str]) -> dict[str, PolicyRecord]:
        rows = self._read(
            f"SELECT DISTINCT ON (vehicle_id) {self._POLICY_COLUMNS} FROM owner_policies "
            "WHERE vehicle_id = ANY(%s::text[]) ORDER BY vehicle_id, version DESC",
            (list(vehicle_ids),),
        )
        return {row[0]: PolicyRecord(*row) for row in rows}

    def policies_since(self, since: float) -> list[PolicyRecord]:
        rows = self._read(
            f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE created_at >= %s "
            "ORDER BY created_at, vehicle_id, version",
            (since,),
        )
        return [PolicyRecord(*row) for row in rows]

    def policy_history(self, vehicle_id: str, limit: int = 1000) -> list[PolicyRecord]:
        rows = self._read(
            f"SELECT {self._POLICY_COLUMNS} FROM owner_policies WHERE vehicle_id = %s "
            "ORDER BY version DESC LIMIT %s",
            (vehicle_id, limit),
        )
        return [PolicyRecord(*row) for row in reversed(rows)]


class _Chosen(NamedTuple):
    """The batch a kind of ask leases from (in one call of ``lease_units``)."""

    batch_id: str
    purpose: str
    data_region: str
    endpoint: str


class _AskFailed(Exception):
    """An ask's own code (its ``unit_size``) raised before the ask wrote anything."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _counts(pending: int, leased: int, done: int, failed: int) -> RequestCounts:
    return RequestCounts(
        total=pending + leased + done + failed,
        completed=done,
        failed=failed,
        pending=pending,
        leased=leased,
    )
