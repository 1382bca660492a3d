"""Forgetting the per-request rows of finished batches, in SQL shared by both backends.

A batch's requests (payloads, results, errors) live in ``requests`` while it runs; once it is
completed, failed, expired or cancelled, its output and error files hold everything a customer
can read, and the counts live in ``batch_counts``. Kept for ever, those rows would make the
store grow by every request ever served. After a retention period (long enough that a probe of
a late result and any operator post-mortem are over) they are deleted, with the batch's
verdicts; the batch itself, its files, counts and ledger entries stay. ``requests_pruned_at``
marks a batch done, so each sweep looks only at finished batches not yet pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

FINISHED_STATUSES = "('completed', 'failed', 'expired', 'cancelled')"
FINISHED_AT = "COALESCE(completed_at, failed_at, expired_at, cancelled_at)"


class RetentionSql:
    _mark: str

    def _identity_run(self, work: Callable[[Any], T], write: bool) -> T:
        raise NotImplementedError

    def prune_finished_requests(
        self, finished_before: float, now: float, max_batches: int = 20
    ) -> tuple[int, int]:
        mark = self._mark

        def work(db: Any) -> tuple[int, int]:
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT id FROM batches WHERE status IN {FINISHED_STATUSES} "
                    f"AND requests_pruned_at IS NULL AND {FINISHED_AT} < {mark} "
                    f"ORDER BY seq_no LIMIT {mark}",
                    (finished_before, max_batches),
                ).fetchall()
            ]
            rows = 0
            for batch_id in ids:
                rows += db.execute(
                    f"DELETE FROM requests WHERE batch_id = {mark}", (batch_id,)
                ).rowcount
                db.execute(f"DELETE FROM verifications WHERE batch_id = {mark}", (batch_id,))
                db.execute(
                    f"UPDATE batches SET requests_pruned_at = {mark} WHERE id = {mark}",
                    (now, batch_id),
                )
            return len(ids), rows

        return self._identity_run(work, True)
