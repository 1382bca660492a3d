"""API keys and car enrolments in SQL, shared by both backends (the SQL here is the same in
both dialects apart from the parameter mark).

A mixin: the backend supplies ``_identity_run(work, write)``, which runs ``work`` on a
connection (in one transaction if ``write``), ``_mark``, its parameter placeholder, and
``_unique_violation``, the error its driver raises when an insert breaks a unique key.
These are cold paths (a key is looked up once per cache period, enrolments change when an
operator acts), so plain statements are enough.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from idlefleet.coordinator.store.base import ApiKeyRecord, Enrolment

T = TypeVar("T")

KEY_COLUMNS = (
    "id, secret_sha256, role, principal, name, created_at, revoked_at, requests_per_minute, "
    "tokens_per_minute, queued_requests"
)
ENROLMENT_COLUMNS = "vehicle_id, nkey, owner, enrolled_at, revoked_at, expires_at"
QUEUED_STATUSES = "('validating', 'in_progress', 'finalizing')"


class IdentitySql:
    _mark: str
    _unique_violation: type[Exception]

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text.replace("?", self._mark)

    # -- API keys ------------------------------------------------------------------------------
    def put_api_key(self, record: ApiKeyRecord) -> None:
        def work(db: Any) -> None:
            taken = db.execute(
                self._sql("SELECT 1 FROM api_keys WHERE id = ? OR secret_sha256 = ?"),
                (record.id, record.secret_sha256),
            ).fetchone()
            if taken:
                raise ValueError(f"API key {record.id} (or its secret) exists already")
            db.execute(
                self._sql(f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"),
                (
                    record.id,
                    record.secret_sha256,
                    record.role,
                    record.principal,
                    record.name,
                    record.created_at,
                    record.revoked_at,
                    record.requests_per_minute,
                    record.tokens_per_minute,
                    record.queued_requests,
                ),
            )

        self._identity_run(work, True)

    def api_key_by_hash(self, secret_sha256: str) -> ApiKeyRecord | None:
        row = self._identity_run(
            lambda db: db.execute(
                self._sql(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_sha256 = ?"),
                (secret_sha256,),
            ).fetchone(),
            False,
        )
        return ApiKeyRecord(*row) if row else None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        rows = self._identity_run(
            lambda db: db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
            ).fetchall(),
            False,
        )
        return [ApiKeyRecord(*row) for row in rows]

    def revoke_api_key(self, key_id: str, now: float) -> bool:
        return self._identity_run(
            lambda db: (
                db.execute(
                    self._sql(
                        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                    ),
                    (now, key_id),
                ).rowcount
                > 0
            ),
            True,
        )

    # -- enrolments ----------------------------------------------------------------------------
    def enrol(self, enrolment: Enrolment) -> None:
        def work(db: Any) -> None:
            row = db.execute(
                self._sql("SELECT vehicle_id, revoked_at FROM enrolments WHERE nkey = ?"),
                (enrolment.nkey,),
            ).fetchone()
            if row is not None:
                raise ValueError(f"nkey {enrolment.nkey} is already the key of car {row[0]}")
            row = db.execute(
                self._sql("SELECT revoked_at FROM enrolments WHERE vehicle_id = ?"),
                (enrolment.vehicle_id,),
            ).fetchone()
            if row is not None and row[0] is None:
                raise ValueError(f"car {enrolment.vehicle_id} is enrolled already; revoke it first")
            if row is not None:
                db.execute(
                    self._sql("DELETE FROM enrolments WHERE vehicle_id = ?"),
                    (enrolment.vehicle_id,),
                )
            try:
                db.execute(
                    self._sql(f"INSERT INTO enrolments ({ENROLMENT_COLUMNS}) VALUES (?,?,?,?,?,?)"),
                    (
                        enrolment.vehicle_id,
                        enrolment.nkey,
                        enrolment.owner,
                        enrolment.enrolled_at,
                        enrolment.revoked_at,
                        enrolment.expires_at,
                    ),
                )
            except self._unique_violation:
                # Another call (another replica) enrolled this car or this nkey between our
                # look-up and our insert: PostgreSQL's READ COMMITTED lets both look-ups miss.
                # The same refusal as if it had come first; the transaction rolls back.
                raise ValueError(
                    f"car {enrolment.vehicle_id} or nkey {enrolment.nkey} was enrolled by "
                    "another call at the same moment"
                ) from None

        self._identity_run(work, True)

    def revoke_enrolment(self, vehicle_id: str, now: float) -> bool:
        return self._identity_run(
            lambda db: (
                db.execute(
                    self._sql(
                        "UPDATE enrolments SET revoked_at = ? "
                        "WHERE vehicle_id = ? AND revoked_at IS NULL"
                    ),
                    (now, vehicle_id),
                ).rowcount
                > 0
            ),
            True,
        )

    def get_enrolment(self, vehicle_id: str) -> Enrolment | None:
        row = self._identity_run(
            lambda db: db.execute(
                self._sql(f"SELECT {ENROLMENT_COLUMNS} FROM enrolments WHERE vehicle_id = ?"),
                (vehicle_id,),
            ).fetchone(),
            False,
        )
        return Enrolment(*row) if row else None

    def enrolments(self, owner: str | None = None) -> list[Enrolment]:
        def work(db: Any) -> list[Any]:
            if owner is None:
                query = f"SELECT {ENROLMENT_COLUMNS} FROM enrolments ORDER BY vehicle_id"
                return list(db.execute(query).fetchall())
            return list(
                db.execute(
                    self._sql(
                        f"SELECT {ENROLMENT_COLUMNS} FROM enrolments WHERE owner = ? "
                        "ORDER BY vehicle_id"
                    ),
                    (owner,),
                ).fetchall()
            )

        return [Enrolment(*row) for row in self._identity_run(work, False)]

    def enrolment_revision(self) -> tuple[int, int, float, float]:
        # Counts as well as times: a revocation always adds a revoked row, whatever the
        # clock of the replica that stamped it says; sums catch a re-enrolment's new row.
        row = self._identity_run(
            lambda db: db.execute(
                "SELECT COUNT(*), COUNT(revoked_at), COALESCE(SUM(enrolled_at), 0), "
                "COALESCE(SUM(revoked_at), 0) FROM enrolments"
            ).fetchone(),
            False,
        )
        return int(row[0]), int(row[1]), float(row[2]), float(row[3])

    def queued_requests(self, principal: str) -> int:
        # A validating batch counts its input's lines (its requests are still being stored)
        # when they were counted; a running one what it has left to do.
        live = (
            "(SELECT COALESCE(SUM(c.pending + c.leased), 0) FROM batch_counts c "
            "WHERE c.batch_id = b.id)"
        )
        row = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT COALESCE(SUM(CASE WHEN b.status = 'validating' "
                    f"THEN COALESCE(b.expected_requests, {live}) ELSE {live} END), 0) "
                    "FROM batches b "
                    f"WHERE b.principal = ? AND b.status IN {QUEUED_STATUSES}"
                ),
                (principal,),
            ).fetchone(),
            False,
        )
        return int(row[0])
