"""Verification's records in SQL, shared by both backends (as ``identity_sql``).

Cars' trust rows and verdicts are written when a probe is judged (a few percent of results),
and read when a replica first meets a car or an operator looks: cold paths, plain statements.
Two calls touch requests: :meth:`VerificationSql.redo_results` (a car quarantined: its results
in running batches go back to the queue; rare) and the strict-batch reads, which walk one
batch's rows by its primary key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from idlefleet.coordinator.trust import CarTrust

T = TypeVar("T")

TRUST_COLUMNS = "vehicle_id, streak, agreed, disagreed, verified_through, quarantined_at, reason"


@dataclass(frozen=True)
class VerdictRow:
    """The verdict on one car's result of one request (strict batches)."""

    batch_id: str
    seq: int
    vehicle_id: str
    verdict: str
    verifier_id: str | None
    at: float


@dataclass(frozen=True)
class DoneRequest:
    """A finished request as verification reads it: who made its result, and what it was."""

    seq: int
    vehicle_id: str
    model: str
    payload: Any
    result: bytes


class VerificationSql:
    _mark: str

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text.replace("?", self._mark)

    # -- trust ---------------------------------------------------------------------------------
    def get_trust(self, vehicle_ids: Collection[str]) -> dict[str, CarTrust]:
        """The trust rows of these cars (a car never judged has none)."""
        if not vehicle_ids:
            return {}
        ids = sorted(set(vehicle_ids))
        marks = ",".join("?" * len(ids))
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    f"SELECT {TRUST_COLUMNS} FROM vehicle_trust WHERE vehicle_id IN ({marks})"
                ),
                ids,
            ).fetchall(),
            False,
        )
        return {row[0]: _trust(row) for row in rows}

    def put_trust(self, records: Sequence[CarTrust], now: float) -> None:
        """Write these cars' trust rows (insert or replace), in one transaction."""
        self.record_verification(records, (), now)

    def record_verification(
        self, records: Sequence[CarTrust], verdicts: Sequence[VerdictRow], now: float
    ) -> None:
        """Trust rows (insert or replace) and verdicts (the first for a result stands), in
        one transaction: what a replica's verifier judged since it last wrote."""

        def work(db: Any) -> None:
            self._verdict_rows(db, verdicts)
            for r in records:
                db.execute(
                    self._sql(
                        f"INSERT INTO vehicle_trust ({TRUST_COLUMNS}, updated_at) "
                        "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (vehicle_id) DO UPDATE SET "
                        "streak = excluded.streak, agreed = excluded.agreed, "
                        "disagreed = excluded.disagreed, "
                        "verified_through = excluded.verified_through, "
                        "quarantined_at = excluded.quarantined_at, reason = excluded.reason, "
                        "updated_at = excluded.updated_at"
                    ),
                    (
                        r.vehicle_id,
                        r.streak,
                        r.agreed,
                        r.disagreed,
                        r.verified_through,
                        r.quarantined_at,
                        r.reason,
                        now,
                    ),
                )

        if records or verdicts:
            self._identity_run(work, True)

    def list_trust(self, quarantined_only: bool = False, limit: int = 10_000) -> list[CarTrust]:
        where = "WHERE quarantined_at IS NOT NULL " if quarantined_only else ""
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    f"SELECT {TRUST_COLUMNS} FROM vehicle_trust {where}ORDER BY vehicle_id LIMIT ?"
                ),
                (limit,),
            ).fetchall(),
            False,
        )
        return [_trust(row) for row in rows]

    # -- results -------------------------------------------------------------------------------
    def redo_results(self, vehicle_id: str) -> int:
        """Put the car's results in running batches back in the queue (it was quarantined):
        they are run again by other cars. Batches already finalised keep theirs."""

        def work(db: Any) -> int:
            batches = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM batches WHERE status = 'in_progress'"
                ).fetchall()
            ]
            redone = 0
            for batch_id in batches:
                redone += db.execute(
                    self._sql(
                        "UPDATE requests SET state = 'pending', result = NULL, "
                        "token_count = NULL, vehicle_id = NULL, lease_id = NULL "
                        "WHERE batch_id = ? AND vehicle_id = ? AND state = 'done'"
                    ),
                    (batch_id, vehicle_id),
                ).rowcount
            return redone

        return self._identity_run(work, True)

    def withdraw_verdicts(self, verifier_id: str) -> int:
        """Delete the car's 'agree' verdicts in running batches (it was quarantined): a strict
        batch probes those results again instead of finalising on a cheater's word."""

        def work(db: Any) -> int:
            withdrawn = 0
            for (batch_id,) in db.execute(
                "SELECT id FROM batches WHERE status = 'in_progress'"
            ).fetchall():
                withdrawn += db.execute(
                    self._sql(
                        "DELETE FROM verifications WHERE batch_id = ? AND verifier_id = ? "
                        "AND verdict = 'agree'"
                    ),
                    (batch_id, verifier_id),
                ).rowcount
            return withdrawn

        return int(self._identity_run(work, True))

    def done_requests(self, batch_id: str, seqs: Collection[int]) -> dict[int, DoneRequest]:
        """These requests of a batch, those that are done, with the car that made each."""
        if not seqs:
            return {}
        wanted = sorted(set(seqs))
        marks = ",".join("?" * len(wanted))
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT seq, vehicle_id, model, payload, result FROM requests "
                    f"WHERE batch_id = ? AND seq IN ({marks}) AND state = 'done' "
                    "AND vehicle_id IS NOT NULL AND result IS NOT NULL"
                ),
                (batch_id, *wanted),
            ).fetchall(),
            False,
        )
        return {row[0]: _done(row) for row in rows}

    def unverified_requests(self, batch_id: str, limit: int = 1000) -> list[DoneRequest]:
        """Done requests of a batch whose result has no 'agree' verdict for the car that made
        it (a strict batch waits for these)."""
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT r.seq, r.vehicle_id, r.model, r.payload, r.result FROM requests r "
                    "WHERE r.batch_id = ? AND r.state = 'done' AND r.vehicle_id IS NOT NULL "
                    "AND NOT EXISTS (SELECT 1 FROM verifications v WHERE v.batch_id = r.batch_id "
                    "AND v.seq = r.seq AND v.vehicle_id = r.vehicle_id AND v.verdict = 'agree') "
                    "ORDER BY r.seq LIMIT ?"
                ),
                (batch_id, limit),
            ).fetchall(),
            False,
        )
        return [_done(row) for row in rows]

    def list_verdicts(self, batch_id: str) -> list[VerdictRow]:
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT batch_id, seq, vehicle_id, verdict, verifier_id, at "
                    "FROM verifications WHERE batch_id = ? ORDER BY seq, vehicle_id"
                ),
                (batch_id,),
            ).fetchall(),
            False,
        )
        return [VerdictRow(r[0], int(r[1]), r[2], r[3], r[4], float(r[5])) for r in rows]

    def record_verdicts(self, rows: Sequence[VerdictRow]) -> None:
        """Keep verdicts on results (the first for a result stands)."""
        if rows:
            self._identity_run(lambda db: self._verdict_rows(db, rows), True)

    def _verdict_rows(self, db: Any, rows: Sequence[VerdictRow]) -> None:
        for r in rows:
            db.execute(
                self._sql(
                    "INSERT INTO verifications (batch_id, seq, vehicle_id, verdict, "
                    "verifier_id, at) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT (batch_id, seq, vehicle_id) DO NOTHING"
                ),
                (r.batch_id, r.seq, r.vehicle_id, r.verdict, r.verifier_id, r.at),
            )

    def shared_secret(self, name: str) -> bytes:
        """A random secret every replica reads the same (made by the first to ask)."""
        candidate = secrets.token_hex(32)

        def work(db: Any) -> str:
            db.execute(
                self._sql(
                    "INSERT INTO coordinator_secrets (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO NOTHING"
                ),
                (name, candidate),
            )
            row = db.execute(
                self._sql("SELECT value FROM coordinator_secrets WHERE name = ?"), (name,)
            ).fetchone()
            return str(row[0])

        return bytes.fromhex(self._identity_run(work, True))


def _trust(row: Sequence[Any]) -> CarTrust:
    return CarTrust(
        vehicle_id=row[0],
        streak=int(row[1]),
        agreed=int(row[2]),
        disagreed=int(row[3]),
        verified_through=float(row[4]),
        quarantined_at=None if row[5] is None else float(row[5]),
        reason=row[6],
    )


def _done(row: Sequence[Any]) -> DoneRequest:
    payload = row[3]
    return DoneRequest(
        seq=int(row[0]),
        vehicle_id=row[1],
        model=row[2],
        payload=json.loads(payload) if isinstance(payload, str | bytes) else payload,
        result=bytes(row[4]),
    )
