"""The fleet at a glance in SQL, shared by both backends (as ``ledger_sql``): what ``/metrics``
and the dashboard read on every scrape or refresh, in one read transaction of aggregate
queries that each walk an index, so a scrape costs O(live cars + unfinished batches), never a
scan of every request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from idlefleet.coordinator.store.base import FleetCounts
from idlefleet.coordinator.store.identity_sql import QUEUED_STATUSES

T = TypeVar("T")


class OverviewSql:
    _mark: str

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    def fleet_counts(self, live_since: float) -> FleetCounts:
        mark = self._mark

        def work(db: Any) -> FleetCounts:
            batches = db.execute("SELECT status, COUNT(*) FROM batches GROUP BY status").fetchall()
            queue = db.execute(
                "SELECT COALESCE(SUM(c.pending), 0), COALESCE(SUM(c.leased), 0) "
                "FROM batches b JOIN batch_counts c ON c.batch_id = b.id "
                f"WHERE b.status IN {QUEUED_STATUSES}"
            ).fetchone()
            (leases,) = db.execute("SELECT COUNT(*) FROM leases WHERE state = 'active'").fetchone()
            cars = db.execute(
                f"SELECT status, COUNT(*) FROM vehicles WHERE last_seen >= {mark} GROUP BY status",
                (live_since,),
            ).fetchall()
            (known,) = db.execute("SELECT COUNT(*) FROM vehicles").fetchone()
            live = {str(status): int(n) for status, n in cars}
            return FleetCounts(
                batches={str(status): int(n) for status, n in batches},
                pending_requests=int(queue[0]),
                leased_requests=int(queue[1]),
                active_leases=int(leases),
                live_cars=live,
                offline_cars=int(known) - sum(live.values()),
            )

        return self._identity_run(work, False)
