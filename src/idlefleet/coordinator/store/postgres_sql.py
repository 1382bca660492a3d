"""The PostgreSQL backend's hot-path statements, kept apart from the code that runs them.

Each is planned to touch only the rows of one unit: by primary key, or through
``requests_ready`` in lease order; ``tests/coordinator/store/test_postgres_store.py`` holds them
to that with EXPLAIN, also as generic plans (psycopg prepares a statement after five runs).
"""

from __future__ import annotations

from idlefleet.coordinator.store.sql_common import BATCH_COLUMNS, LEASABLE

BATCH_SELECT = (
    f"SELECT {BATCH_COLUMNS}, n.pending, n.leased, n.done, n.failed FROM batches b "
    "CROSS JOIN LATERAL (SELECT COALESCE(SUM(c.pending), 0)::bigint, "
    "COALESCE(SUM(c.leased), 0)::bigint, COALESCE(SUM(c.done), 0)::bigint, "
    "COALESCE(SUM(c.failed), 0)::bigint FROM batch_counts c WHERE c.batch_id = b.id) "
    "AS n(pending, leased, done, failed)"
)
"""A batch with its request counts: the trigger's shards summed (at most 16 rows per batch)."""

CHOOSE_BATCH_SQL = (
    """
SELECT b.id, b.purpose, b.data_region, b.endpoint,
    (SELECT COALESCE(SUM(c.pending), 0)::bigint FROM batch_counts c WHERE c.batch_id = b.id)
FROM batches b
WHERE b.status IN ("""
    + LEASABLE
    + """) AND b.purpose = ANY(%(purposes)s::text[])
    AND b.data_region = ANY(%(regions)s::text[]) AND b.id <> ALL(%(skip)s::text[])
    AND (SELECT r.seq FROM requests r
         WHERE r.batch_id = b.id AND r.state = 'pending' AND r.model = ANY(%(models)s::text[])
         ORDER BY r.sort_key DESC, r.seq LIMIT 1) IS NOT NULL
ORDER BY b.seq_no LIMIT 1
"""
)
"""The oldest leasable batch (in progress, or validating with its first requests stored) the
ask may work on, with its pending count for unit_size.

Whether a batch has pending work is asked in lease order, which only ``requests_ready``
answers without a sort, so it is always that index: an ``EXISTS`` may be planned as a walk
along the primary key that passes every finished request of the batch first.
"""

PICK_UNIT_SQL = """
WITH picked AS MATERIALIZED (
    SELECT seq, custom_id, payload, model, sort_key, progress FROM requests
    WHERE batch_id = %(batch)s AND state = 'pending' AND model = ANY(%(models)s::text[])
    ORDER BY sort_key DESC, seq LIMIT %(size)s
    FOR UPDATE SKIP LOCKED
), same_model AS MATERIALIZED (
    SELECT *, row_number() OVER w AS n, sum(octet_length(payload)) OVER w AS running
    FROM picked
    WHERE model = (SELECT model FROM picked ORDER BY sort_key DESC, seq LIMIT 1)
    WINDOW w AS (ORDER BY sort_key DESC, seq)
), unit AS MATERIALIZED (
    SELECT seq, custom_id, payload, model, sort_key, progress FROM same_model
    WHERE n = 1 OR %(max_bytes)s::bigint IS NULL OR running <= %(max_bytes)s::bigint
), leased AS (
    UPDATE requests r SET state = 'leased', lease_id = %(lease)s
    FROM unit u WHERE r.batch_id = %(batch)s AND r.seq = u.seq
), lease AS (
    INSERT INTO leases (id, batch_id, vehicle_id, model, seqs, created_at, deadline, state)
    SELECT %(lease)s::text, %(batch)s::text, %(vehicle)s::text, min(model),
        json_agg(seq ORDER BY sort_key DESC, seq)::text, %(now)s::float8, %(deadline)s::float8,
        'active'
    FROM unit HAVING count(*) > 0
)
SELECT seq, custom_id, payload, model, progress FROM unit ORDER BY sort_key DESC, seq
"""
"""Cut a unit off the batch, lease it and record the lease: one statement, one round trip.

``requests_ready`` (batch_id, state, sort_key DESC, seq) yields the pending requests in lease
order, so the scan stops after ``size`` rows (no sort of the batch). SKIP LOCKED passes over
requests another transaction is leasing or committing right now. One lease carries one model:
of the picked requests, those of the first one's model are leased, as many as fit
``max_bytes`` (``LeaseAsk.max_bytes``; the first always); the others stay pending.
"""

FIND_LEASE_SQL = """
UPDATE leases l SET energy_j = l.energy_j + %(energy)s::float8,
    deadline = CASE WHEN l.state = 'active' THEN %(deadline)s::float8 ELSE l.deadline END
WHERE l.id = %(lease)s AND l.vehicle_id = %(vehicle)s
RETURNING l.batch_id, l.seqs, l.state,
    ARRAY(SELECT DISTINCT x.lease_id
          FROM (SELECT r.seq, r.state, r.lease_id FROM requests r
                WHERE r.batch_id = l.batch_id AND r.seq = ANY(%(seqs)s::bigint[]) OFFSET 0) x
          WHERE x.state = 'leased' AND x.lease_id <> l.id
              AND x.seq IN (SELECT value::bigint FROM json_array_elements_text(l.seqs::json)))
"""
"""Find a vehicle's lease, add the chunk's energy and extend it if active; locks its row.

Also names the other leases that hold requests of this lease now (a late answer), so that they
can be locked before the requests: every transaction locks lease rows before request rows.
The other way round, a late answer holding the requests would wait for the new holder's lease
row while the new holder's own commit, holding that row, waits for the requests: a deadlock.
The requests are looked up by primary key alone and filtered on state after (``OFFSET 0``
keeps the planner from pushing the state into the scan), since the index on state would walk
every leased request of the batch.
"""

COMMIT_RESULTS_SQL = """
WITH incoming (seq, result, token_count) AS (
    SELECT * FROM unnest(%(seqs)b::bigint[], %(results)b::bytea[], %(tokens)b::bigint[])
), locked AS MATERIALIZED (
    SELECT seq, state, lease_id FROM requests
    WHERE batch_id = %(batch)s AND seq = ANY(%(seqs)b::bigint[])
    ORDER BY seq
    FOR UPDATE
), open AS (
    SELECT * FROM locked WHERE state IN ('pending', 'leased')
), done AS (
    UPDATE requests r SET state = 'done', result = i.result, token_count = i.token_count,
        vehicle_id = %(vehicle)s, lease_id = %(lease)s
    FROM incoming i JOIN open o ON o.seq = i.seq
    WHERE r.batch_id = %(batch)s AND r.seq = i.seq
    RETURNING o.state AS was, o.lease_id AS held_by
), closed AS (
    UPDATE leases SET state = 'finished' WHERE id = %(lease)s AND state = 'active'
        AND (SELECT count(*) FROM (SELECT state, lease_id FROM requests
                                   WHERE batch_id = %(batch)s
                                       AND seq = ANY(%(lease_seqs)b::bigint[]) OFFSET 0) own
             WHERE own.lease_id = %(lease)s AND own.state = 'leased')
            = (SELECT count(*) FROM done WHERE was = 'leased' AND held_by = %(lease)s)
    RETURNING id
)
SELECT (SELECT count(*) FROM done),
    (SELECT array_agg(DISTINCT held_by) FROM done WHERE was = 'leased' AND held_by <> %(lease)s),
    EXISTS (SELECT 1 FROM closed)
"""
"""Commit a chunk's results (first result wins) and finish the own lease if that was its last.

Answers how many were committed, which other leases held requests this late answer finished,
and whether the own lease finished: it does when every request it has open (in the
statement's snapshot) is among those this chunk finished. ``locked`` locks the chunk's
requests in seq order, by primary key alone (a condition on state could make the planner walk
a whole state of the batch), waiting for a concurrent committer and then reading the row as it
left it, so a request finished meanwhile is not ``open`` and counts as a duplicate.

The snapshot is exact about the own lease because its row is locked (see
:data:`FIND_LEASE_SQL`), and whatever finishes or returns a lease's requests locks that lease's
row first: a concurrent late answer commits after us and finishes the lease itself if it
finished its last request. The lease's requests are looked up by primary key, from the seqs
the lease was given, and only then filtered on holder and state (``OFFSET 0`` keeps those out
of the scan, which an index on state would otherwise walk).
"""

RECORD_PROGRESS_SQL = """
WITH lease AS (
    UPDATE leases l
    SET deadline = CASE WHEN l.state = 'active' THEN %(deadline)s::float8 ELSE l.deadline END
    WHERE l.id = %(lease)s AND l.vehicle_id = %(vehicle)s
    RETURNING l.batch_id, l.state
), written AS (
    UPDATE requests r SET progress = i.progress
    FROM lease, unnest(%(seqs)b::bigint[], %(progress)b::bytea[]) AS i(seq, progress)
    WHERE lease.state = 'active' AND r.batch_id = lease.batch_id AND r.seq = i.seq
        AND r.lease_id = %(lease)s AND r.state = 'leased'
    RETURNING r.seq
)
SELECT state, (SELECT count(*) FROM written) FROM lease
"""
"""Keep a car's progress on the requests its lease still holds, and extend the lease if active.

Answers the lease's state and how many requests got their progress; no row: the lease is not
this vehicle's. The lease's row is locked before any of its requests, as everywhere (see
:data:`FIND_LEASE_SQL`): the requests' update joins the row the lease's update returns, so it
has nothing to update before that. ``seqs`` come one of each (of several rows for one request,
which would win is not defined) and sorted, so concurrent writers lock requests in one order.
Each request is found by primary key and its holder and state checked on the row found, which
READ COMMITTED checks again after waiting for a concurrent commit: a request that a late
answer finished meanwhile is left alone.
"""

LEASE_SEQS = "ARRAY(SELECT value::bigint FROM json_array_elements_text({}.seqs::json))"
"""The seqs of the requests a lease was given (``leases.seqs``), as an array for ``= ANY``."""

CLOSE_IF_FINISHED_SQL = f"""
UPDATE leases l SET state = 'finished'
WHERE l.id = ANY(%s::text[]) AND l.state = 'active'
    AND NOT EXISTS (SELECT 1 FROM (SELECT r.state, r.lease_id FROM requests r
                                   WHERE r.batch_id = l.batch_id
                                       AND r.seq = ANY({LEASE_SEQS.format("l")}) OFFSET 0) x
                    WHERE x.lease_id = l.id AND x.state = 'leased')
"""
"""Finish the given active leases that have no request open left (looked up by primary key)."""

_OUT_OF_ATTEMPTS = "%(failed)s AND r.attempts + 1 >= %(max_attempts)s"
REQUEUE_SQL = f"""
UPDATE requests r SET
    attempts = r.attempts + CASE WHEN %(failed)s THEN 1 ELSE 0 END,
    state = CASE WHEN {_OUT_OF_ATTEMPTS} THEN 'failed' ELSE 'pending' END,
    error_status = CASE WHEN {_OUT_OF_ATTEMPTS} THEN %(error_status)s ELSE r.error_status END,
    error_body = CASE WHEN {_OUT_OF_ATTEMPTS} THEN %(error_body)s ELSE r.error_body END,
    lease_id = NULL
FROM ended e
WHERE r.batch_id = e.batch_id AND r.seq = ANY(e.wanted)
    AND r.lease_id = e.id AND r.state = 'leased'
RETURNING r.state
"""
"""Put back in the queue what the leases of CTE ``ended`` (id, batch_id, wanted: the seqs to
put back) still hold; with ``failed``, each counts an attempt and those out of attempts end
failed (``Store.max_attempts``). Named parameters: failed, max_attempts, error_status,
error_body. Returns a row per request with its new state."""
