"""What only the PostgreSQL backend promises, beyond the contract in ``test_store_contract.py``.

Coordinator replicas share one database: they must start together on a fresh one, never hand
out a request twice nor wait for each other's units (SKIP LOCKED), keep the hot paths on the
indexes, and ride through a restart or a crash of the server without being reopened. Its schema
must match SQLite's column for column, since both come from the same migrations. Restarts and
crashes happen on a private server of this module's own, never on the shared one.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from idlefleet.coordinator.store import (
    Lease,
    RequestCounts,
    StoreUnavailable,
    open_store,
    sqlite_url,
)
from idlefleet.coordinator.store.migrations import MIGRATIONS
from idlefleet.coordinator.store.postgres import PostgresStore
from idlefleet.coordinator.store.postgres_sql import (
    CHOOSE_BATCH_SQL,
    CLOSE_IF_FINISHED_SQL,
    COMMIT_RESULTS_SQL,
    FIND_LEASE_SQL,
    LEASE_SEQS,
    PICK_UNIT_SQL,
    REQUEUE_SQL,
)
from idlefleet.embedded.postgres import PrivatePostgres, create_database
from tests.coordinator.store.test_store_contract import (
    ANY,
    LATEST_SCHEMA,
    LEASE_SECONDS,
    MODEL,
    NOW,
    add_batch,
    ask,
    batch_record,
    commit,
    embedding_request,
    must_lease,
    postgres_url,
    seqs_of,
    take,
)

# -- servers and databases -------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_server(
    private_postgres_factory: Callable[[Path], AbstractContextManager[PrivatePostgres]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrivatePostgres]:
    """A private server for this module's outage tests (one initdb, not one per test)."""
    with private_postgres_factory(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def server(own_server: PrivatePostgres) -> PrivatePostgres:
    """The module's private server, started again if an earlier test left it down."""
    if own_server.pid is None:
        own_server.start()
    return own_server


@pytest.fixture
def server_url(server: PrivatePostgres) -> str:
    """URL of a new database on the private server."""
    return postgres_url(create_database(server.dsn(), f"store_{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def url(postgres_database: str) -> str:
    """URL of a new database on the shared server (for tests that signal no server)."""
    return postgres_url(postgres_database)


def filled(store: PostgresStore) -> PostgresStore:
    """Wait until every connection of the pool is open (so that an outage leaves them stale)."""
    store._pool.wait(timeout=30)
    return store


# -- outages ---------------------------------------------------------------------------------


def _restart(server: PrivatePostgres) -> None:
    server.restart()


def _crash_and_start(server: PrivatePostgres) -> None:
    server.kill()
    server.start()


OUTAGES = {"restart": _restart, "crash": _crash_and_start}


@pytest.mark.parametrize("outage", sorted(OUTAGES))
@pytest.mark.parametrize("first_call", ["write", "read"])
def test_an_open_store_works_at_once_after_the_server_comes_back(
    server: PrivatePostgres, server_url: str, outage: str, first_call: str
) -> None:
    store = filled(PostgresStore(server_url, min_size=4, max_size=4))
    try:
        add_batch(store, n=6)
        first = must_lease(store, "car-1", size=2)
        commit(store, first, [0])
        assert store._pool.get_stats()["pool_available"] == 4  # all of them about to go stale

        OUTAGES[outage](server)

        # Not one call fails, the first one included: every pooled connection is dead, and
        # the store finds that out before sending anything.
        if first_call == "write":
            second = must_lease(store, "car-2", size=2)
            counts = store.request_counts("batch-1")
        else:
            counts = store.request_counts("batch-1")
            second = must_lease(store, "car-2", size=2)
        assert seqs_of(second) == [2, 3]
        leased_now = 3 if first_call == "write" else 1
        assert counts == RequestCounts(
            total=6, completed=1, leased=leased_now, pending=5 - leased_now
        )
        assert commit(store, first, [1]).lease_finished
        assert store.request_counts("batch-1") == RequestCounts(
            total=6, completed=2, leased=2, pending=2
        )
    finally:
        store.close()


@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_a_call_in_flight_during_an_outage_fails_whole_and_the_next_one_succeeds(
    server: PrivatePostgres, server_url: str, outage: str
) -> None:
    store = PostgresStore(server_url)
    try:
        add_batch(store, n=6)

        def outage_meanwhile(pending: int) -> int:
            OUTAGES[outage](server)  # the first ask's unit is leased, not yet committed
            return 2

        with pytest.raises(StoreUnavailable) as raised:
            store.lease_units(
                [ask("car-1", 2), ask("car-2", unit_size=outage_meanwhile)], NOW, LEASE_SECONDS
            )

        assert str(raised.value)  # the driver's message
        assert store.request_counts("batch-1") == RequestCounts(total=6, pending=6)
        assert store.active_lease_count("batch-1") == 0
        assert seqs_of(must_lease(store, "car-3", size=6)) == [0, 1, 2, 3, 4, 5]
    finally:
        store.close()


def test_calls_while_the_server_is_down_are_unavailable_and_the_first_after_works(
    server: PrivatePostgres, server_url: str
) -> None:
    store = filled(PostgresStore(server_url, min_size=2, max_size=2, timeout=1.0))
    try:
        add_batch(store, n=4)
        server.stop()

        with pytest.raises(StoreUnavailable):
            store.request_counts("batch-1")
        with pytest.raises(StoreUnavailable):
            must_lease(store, "car-1", size=2)
        server.start()

        assert store.request_counts("batch-1") == RequestCounts(total=4, pending=4)
        assert seqs_of(must_lease(store, "car-1", size=2)) == [0, 1]
    finally:
        store.close()


def test_opening_a_store_on_an_unreachable_server_is_unavailable(server: PrivatePostgres) -> None:
    stopped_dsn = server.dsn()
    server.stop()

    with pytest.raises(StoreUnavailable, match=str(server.port)):
        open_store(postgres_url(stopped_dsn))


# -- replicas --------------------------------------------------------------------------------


def _backend_pid(store: PostgresStore) -> int:
    with store._pool.connection() as conn:
        return conn.info.backend_pid


def _one_session_stores_in_different_count_shards(url: str) -> tuple[PostgresStore, PostgresStore]:
    """Two single-session stores whose sessions count into different ``batch_counts`` shards.

    Each session adds its changes of request counts into shard ``pg_backend_pid() % 16``, so
    two sessions of one shard do wait for each other's commit on that row: the price of 16
    shards. The no-waiting promise is about the requests, so it is checked with two shards.
    """
    first = PostgresStore(url, min_size=1, max_size=1)
    shard = _backend_pid(first) % 16
    others = []
    while True:
        second = PostgresStore(url, min_size=1, max_size=1)
        if _backend_pid(second) % 16 != shard:
            break
        others.append(second)  # keep its session open, so the next store gets another pid
    for other in others:
        other.close()
    return first, second


def test_a_replica_leases_past_a_unit_another_one_is_still_leasing(url: str) -> None:
    a, b = _one_session_stores_in_different_count_shards(url)
    try:
        add_batch(a, n=100)
        a_inside = threading.Event()
        a_may_go = threading.Event()

        def hold(pending: int) -> int:
            a_inside.set()  # A's first unit is leased in its open transaction
            assert a_may_go.wait(timeout=30)
            return 5

        a_got: list[list[Lease | Exception | None]] = []
        a_thread = threading.Thread(
            target=lambda: a_got.append(
                a.lease_units([ask("car-a", 5), ask("car-a", unit_size=hold)], NOW, 30)
            )
        )
        a_thread.start()
        assert a_inside.wait(timeout=30)
        b_got: list[Lease | None] = []
        b_thread = threading.Thread(target=lambda: b_got.append(must_lease(b, "car-b", size=5)))

        b_thread.start()
        b_thread.join(timeout=15)
        b_done_while_a_held = not b_thread.is_alive()
        a_may_go.set()
        a_thread.join(timeout=30)
        b_thread.join(timeout=30)

        assert b_done_while_a_held, "B waited for A's transaction"
        lease_order = [*range(10, 100), *range(10)]  # largest sort_key first: seqs 10-99
        assert b_got and seqs_of(b_got[0]) == lease_order[5:10]  # past A's uncommitted unit
        a_first, a_second = a_got[0]
        assert isinstance(a_first, Lease) and isinstance(a_second, Lease)
        assert seqs_of(a_first) == lease_order[0:5]
        assert seqs_of(a_second) == lease_order[10:15]
        assert a.request_counts("batch-1") == RequestCounts(total=100, leased=15, pending=85)
    finally:
        a.close()
        b.close()


def test_two_replicas_leasing_and_committing_at_once_hand_out_each_request_once(url: str) -> None:
    replicas = [open_store(url), open_store(url)]
    try:
        add_batch(replicas[0], n=1_200)
        start = threading.Barrier(8)
        got: list[list[int]] = [[] for _ in range(8)]
        errors: list[BaseException] = []

        def car(i: int) -> None:
            store = replicas[i % 2]
            try:
                start.wait(timeout=30)
                for n in itertools.count():
                    leased = store.lease_unit(
                        f"car-{i}", f"car-{i}-{n}", [MODEL], NOW, 3_600, take(7), **ANY
                    )
                    if leased is None:
                        return
                    got[i].extend(seqs_of(leased))
                    assert commit(store, leased, seqs_of(leased)).lease_finished
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=car, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

        assert not errors
        handed_out = Counter(seq for per_car in got for seq in per_car)
        assert handed_out == Counter(range(1_200))  # every request exactly once
        assert replicas[1].request_counts("batch-1") == RequestCounts(total=1_200, completed=1_200)
        usage = replicas[1].vehicle_usage("batch-1")
        assert usage == {f"car-{i}": len(got[i]) for i in range(8) if got[i]}
        assert replicas[0].active_lease_count("batch-1") == 0
    finally:
        for store in replicas:
            store.close()


def test_replicas_starting_at_once_on_a_fresh_database_migrate_it_once(url: str) -> None:
    start = threading.Barrier(4)
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []

    def replica() -> None:
        try:
            start.wait(timeout=30)
            opened.append(PostgresStore(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors
        assert [store.schema_version() for store in opened] == [LATEST_SCHEMA] * 4
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
            assert [row[0] for row in rows] == [m.version for m in MIGRATIONS]
    finally:
        for store in opened:
            store.close()


# -- the schema ------------------------------------------------------------------------------


def test_both_dialects_build_the_same_tables_columns_and_indexes(url: str, tmp_path: Path) -> None:
    open_store(url).close()
    open_store(sqlite_url(tmp_path / "store.db")).close()

    with psycopg.connect(url) as conn:
        pg_columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ).fetchall()
        pg_indexes = conn.execute(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema() "
            "AND indexname NOT LIKE '%%_pkey'"
        ).fetchall()
    db = sqlite3.connect(tmp_path / "store.db")
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    sqlite_columns = [
        (table, row[1]) for table in tables for row in db.execute(f"PRAGMA table_info({table})")
    ]
    sqlite_indexes = db.execute(
        "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    ).fetchall()
    db.close()

    def by_table(pairs: list[tuple[Any, ...]]) -> dict[str, set[str]]:
        grouped: dict[str, set[str]] = {}
        for table, name in pairs:
            grouped.setdefault(table, set()).add(name)
        return grouped

    assert by_table(pg_columns) == by_table(sqlite_columns)
    assert by_table(pg_indexes) == by_table(sqlite_indexes)


# -- plans of the hot paths ------------------------------------------------------------------


def _plans(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> list[Any]:
    """PostgreSQL's plan for ``query``: custom (for these values) and generic.

    psycopg prepares a statement it has run five times, after which the server may switch to
    a generic plan, made without the values: both must keep to the indexes.
    """
    custom = conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchone()
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    name = f"plan_{uuid.uuid4().hex[:8]}"
    conn.execute(f"PREPARE {name} AS " + re.sub(r"%\((\w+)\)[sb]", placeholder, query))
    conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        generic = (
            psycopg.ClientCursor(conn)
            .execute(
                f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(['%s'] * len(names))})",
                [params[n] for n in names],
            )
            .fetchone()
        )
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute(f"DEALLOCATE {name}")
    assert custom is not None and generic is not None
    return [_as_json(custom[0])[0]["Plan"], _as_json(generic[0])[0]["Plan"]]


def _as_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _nodes(plan: dict[str, Any], *, inputs_only: bool = False) -> Iterator[dict[str, Any]]:
    """The plan's nodes; with ``inputs_only``, not its InitPlans and SubPlans (a CTE hangs
    under the top node of the query that uses it, but is not that node's input)."""
    yield plan
    for child in plan.get("Plans", []):
        if not (inputs_only and child["Parent Relationship"] in ("InitPlan", "SubPlan")):
            yield from _nodes(child, inputs_only=inputs_only)


def _request_scans(plan: dict[str, Any], *, inputs_only: bool = False) -> list[dict[str, Any]]:
    return [
        node
        for node in _nodes(plan, inputs_only=inputs_only)
        if node.get("Relation Name") == "requests" and node["Node Type"].endswith("Scan")
    ]


def _analysed_batch(url: str, n: int = 20_000) -> PostgresStore:
    """A batch of ``n`` requests of varied length, some leased and done, after a drained one.

    Statistics are taken (ANALYZE), as autovacuum would soon after a batch arrives: the
    planner then knows how many requests each state holds.
    """
    store = PostgresStore(url)
    add_batch(store, "batch-0", n=100, status="completed", created_at=int(NOW))
    store.create_batch(batch_record("batch-1", created_at=int(NOW) + 1))
    store.add_requests(
        "batch-1",
        [embedding_request(seq, f"req-{seq}", ["x" * (1 + seq * 7919 % 400)]) for seq in range(n)],
    )
    for i in range(20):
        leased = must_lease(store, f"car-{i}", size=100)
        if i % 2:
            commit(store, leased, seqs_of(leased))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")
    return store


def test_the_lease_pick_reads_the_unit_off_the_index_without_sorting_the_batch(
    url: str,
) -> None:
    store = _analysed_batch(url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            pick = _plans(
                conn,
                PICK_UNIT_SQL,
                {
                    "batch": "batch-1",
                    "models": [MODEL],
                    "size": 8,
                    "max_bytes": 1_000_000,
                    "lease": "lease-x",
                    "vehicle": "car-x",
                    "now": NOW,
                    "deadline": NOW + LEASE_SECONDS,
                },
            )
            choose = _plans(
                conn,
                CHOOSE_BATCH_SQL,
                {"purposes": ["general"], "regions": ["global"], "skip": [], "models": [MODEL]},
            )
    finally:
        store.close()

    for plan in pick:
        picked = next(p for p in plan["Plans"] if p.get("Subplan Name") == "CTE picked")
        (scan,) = _request_scans(picked)
        assert (scan["Node Type"], scan["Index Name"]) == ("Index Scan", "requests_ready")
        assert "state" in scan["Index Cond"] and "batch_id" in scan["Index Cond"]
        assert [n["Node Type"] for n in _nodes(picked)] == ["Limit", "LockRows", "Index Scan"]
    for plan in pick + choose:
        for node in _nodes(plan):
            assert node["Node Type"] not in ("Seq Scan", "Bitmap Heap Scan") or (
                node.get("Relation Name") != "requests"
            ), node
            if node["Node Type"] == "Sort":
                scans = _request_scans(node, inputs_only=True)
                assert not scans, f"a Sort over the batch's requests: {node}"


def test_committing_and_ending_leases_look_requests_up_by_the_units_keys(url: str) -> None:
    store = _analysed_batch(url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT id, seqs FROM leases WHERE state = 'active' ORDER BY id LIMIT 1"
            ).fetchone()
            assert row is not None
            lease_id, seqs = row[0], json.loads(row[1])
            ended = (
                f"WITH ended AS (SELECT id, batch_id, {LEASE_SEQS.format('leases')} AS wanted "
                "FROM leases WHERE id = %(lease)s) "
            )
            requeue = {
                "lease": lease_id,
                "failed": True,
                "max_attempts": 3,
                "error_status": 500,
                "error_body": "{}",
            }
            statements: list[tuple[str, dict[str, Any]]] = [
                (
                    FIND_LEASE_SQL,
                    {
                        "energy": 0.0,
                        "deadline": NOW,
                        "lease": lease_id,
                        "vehicle": "v",
                        "seqs": seqs,
                    },
                ),
                (
                    COMMIT_RESULTS_SQL,
                    {
                        "seqs": seqs[:8],
                        "results": [b"\0" * 8] * 8,
                        "tokens": [1] * 8,
                        "batch": "batch-1",
                        "vehicle": "v",
                        "lease": lease_id,
                        "lease_seqs": seqs,
                    },
                ),
                (ended + REQUEUE_SQL, requeue),  # release, expiry, return
                (CLOSE_IF_FINISHED_SQL.replace("%s", "%(ids)s"), {"ids": [lease_id]}),
            ]
            plans = [plan for query, params in statements for plan in _plans(conn, query, params)]
    finally:
        store.close()

    for plan in plans:
        scans = _request_scans(plan)
        assert scans
        for scan in scans:
            # Every probe by (batch_id, seq), what the lease names: never a walk along a
            # state of the batch (or of the table).
            probes = [node for node in _nodes(scan) if "Index Cond" in node]
            assert probes, f"requests scanned without an index: {scan}"
            for probe in probes:
                assert "(seq = " in probe["Index Cond"], probe


# -- opening by URL --------------------------------------------------------------------------


def test_postgres_scheme_urls_open_a_postgres_store(postgres_database: str) -> None:
    url = postgres_url(postgres_database).replace("postgresql://", "postgres://", 1)

    store = open_store(url)

    assert isinstance(store, PostgresStore)
    assert store.schema_version() == LATEST_SCHEMA
    store.close()


def test_a_postgresql_url_without_the_driver_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    monkeypatch.delitem(sys.modules, "idlefleet.coordinator.store.postgres")

    with pytest.raises(ValueError, match=r"idlefleet\[postgresql\]"):
        open_store("postgresql://nobody@127.0.0.1:1/none")
