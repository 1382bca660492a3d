"""The ledger in SQL, shared by both backends (as ``identity_sql``).

Two tables, written only by INSERT: ``ledger_entries`` (one row per entry, its id the
idempotency key, with what it was for) and ``ledger_postings`` (an entry's amounts per
account). An entry and its postings go in one transaction, the postings only if the entry was
new, so a replayed entry changes nothing. ``settles`` is unique: a charge is released or
reversed once, never both. Balances are sums over postings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from idlefleet.coordinator.ledger import Entry

T = TypeVar("T")

ENTRY_COLUMNS = (
    "id, kind, at, principal, vehicle_id, owner, model, requests, input_tokens, "
    "output_tokens, energy_j, electricity, work_at, batch_id, settles, api_key_id"
)
MAX_ENTRIES = 100_000


class LedgerSql:
    _mark: str

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text.replace("?", self._mark)

    def post_entries(self, entries: Sequence[Entry]) -> int:
        """Post these entries in one transaction; those already posted (by id), and
        settlements of an already settled charge, are skipped. Returns how many were new."""

        def work(db: Any) -> int:
            new = 0
            for e in entries:
                inserted = db.execute(
                    self._sql(
                        f"INSERT INTO ledger_entries ({ENTRY_COLUMNS}) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
                    ),
                    (
                        e.id,
                        e.kind,
                        e.at,
                        e.principal,
                        e.vehicle_id,
                        e.owner,
                        e.model,
                        e.requests,
                        e.input_tokens,
                        e.output_tokens,
                        e.energy_j,
                        e.electricity,
                        e.work_at,
                        e.batch_id,
                        e.settles,
                        e.api_key_id,
                    ),
                ).rowcount
                if inserted != 1:
                    continue
                new += 1
                for account, amount in e.postings:
                    db.execute(
                        self._sql(
                            "INSERT INTO ledger_postings (entry_id, account, amount) VALUES (?,?,?)"
                        ),
                        (e.id, account, amount),
                    )
            return new

        return self._identity_run(work, True) if entries else 0

    def lease_energy(self, batch_id: str) -> dict[str, float]:
        """Energy each car reported for its leases of a batch, joules."""
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT vehicle_id, SUM(energy_j) FROM leases WHERE batch_id = ? "
                    "GROUP BY vehicle_id"
                ),
                (batch_id,),
            ).fetchall(),
            False,
        )
        return {row[0]: float(row[1] or 0.0) for row in rows}

    def unsettled_charges(
        self, vehicle_id: str, through: float | None = None, limit: int = 10_000
    ) -> list[Entry]:
        """The car's charges neither released nor reversed (work up to ``through``, if given),
        oldest first."""
        bound = "AND e.work_at <= ? " if through is not None else ""
        params: tuple[Any, ...] = (vehicle_id,) + ((through,) if through is not None else ())
        return self._entries(
            "WHERE e.kind = 'charge' AND e.vehicle_id = ? "
            f"{bound}AND NOT EXISTS (SELECT 1 FROM ledger_entries s WHERE s.settles = e.id) "
            "ORDER BY e.work_at, e.id LIMIT ?",
            (*params, limit),
        )

    def ledger_entries(
        self,
        *,
        owner: str | None = None,
        principal: str | None = None,
        vehicle_id: str | None = None,
        batch_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = MAX_ENTRIES,
        api_key_id: str | None = None,
    ) -> list[Entry]:
        """Entries (with their postings) matching every filter given, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("owner", owner),
            ("principal", principal),
            ("vehicle_id", vehicle_id),
            ("batch_id", batch_id),
            ("api_key_id", api_key_id),
        ):
            if value is not None:
                where.append(f"e.{column} = ?")
                params.append(value)
        if since is not None:
            where.append("e.at >= ?")
            params.append(since)
        if until is not None:
            where.append("e.at < ?")
            params.append(until)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        return self._entries(f"{clause}ORDER BY e.at, e.id LIMIT ?", (*params, limit))

    def balances(self, prefix: str = "") -> dict[str, int]:
        """Every account's balance (those whose name starts with ``prefix``)."""
        rows = self._identity_run(
            lambda db: db.execute(
                self._sql(
                    "SELECT account, SUM(amount) FROM ledger_postings WHERE account >= ? "
                    "GROUP BY account ORDER BY account"
                ),
                (prefix,),
            ).fetchall(),
            False,
        )
        return {row[0]: int(row[1]) for row in rows if row[0].startswith(prefix)}

    def _entries(self, tail: str, params: tuple[Any, ...]) -> list[Entry]:
        cols = ", ".join(f"e.{c.strip()}" for c in ENTRY_COLUMNS.split(","))

        def work(db: Any) -> tuple[list[Any], list[Any]]:
            rows = db.execute(
                self._sql(f"SELECT {cols} FROM ledger_entries e {tail}"), params
            ).fetchall()
            if not rows:
                return rows, []
            postings: list[Any] = []
            ids = [row[0] for row in rows]
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ",".join("?" * len(part))
                postings += db.execute(
                    self._sql(
                        "SELECT entry_id, account, amount FROM ledger_postings "
                        f"WHERE entry_id IN ({marks}) ORDER BY entry_id, account"
                    ),
                    part,
                ).fetchall()
            return rows, postings

        rows, postings = self._identity_run(work, False)
        by_entry: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for entry_id, account, amount in postings:
            by_entry[entry_id].append((account, int(amount)))
        return [
            Entry(
                id=row[0],
                kind=row[1],
                at=row[2],
                postings=tuple(by_entry[row[0]]),
                principal=row[3],
                vehicle_id=row[4],
                owner=row[5],
                model=row[6],
                requests=row[7],
                input_tokens=row[8],
                output_tokens=row[9],
                energy_j=row[10],
                electricity=row[11],
                work_at=row[12],
                batch_id=row[13],
                settles=row[14],
                api_key_id=row[15],
            )
            for row in rows
        ]
