"""The contract every :class:`~idlefleet.coordinator.store.base.Store` backend must honour.

One suite, run against every backend in ``BACKENDS`` (Flower's ``linkstate_test.py`` pattern),
SQLite and PostgreSQL: the tests talk only to the abstract interface, so a backend joins by
adding one factory. The MUST-guarantees of ``store/base.py`` each have a test here; time is
always passed as an explicit ``now`` so nothing depends on the wall clock. PostgreSQL stores
live in schemas of one database made for the session, on the server ``postgres_admin_dsn``
names (``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import random
import struct
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from idlefleet.coordinator.accounts import Accounts
from idlefleet.coordinator.ledger import ModelPrice, Prices, Work, charge_entry, release_entry
from idlefleet.coordinator.store import (
    ApiKeyRecord,
    BatchRecord,
    CommitOutcome,
    Enrolment,
    FileRecord,
    Lease,
    LeaseAsk,
    NewRequest,
    RequestCounts,
    RequestResult,
    ResultCommit,
    Store,
    StoredRequest,
    VehicleLiveness,
    VehicleRecord,
    VehicleSeen,
    open_store,
    sqlite_url,
)
from idlefleet.coordinator.store.migrations import MIGRATIONS
from idlefleet.coordinator.store.verification_sql import VerdictRow
from idlefleet.coordinator.trust import CarTrust
from idlefleet.embedded.postgres import create_database, drop_database
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES

# -- backends ------------------------------------------------------------------------------------


def _sqlite_url(request: pytest.FixtureRequest) -> str:
    """A database file in a new directory under pytest's temp root."""
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    return sqlite_url(Path(tempfile.mkdtemp(dir=base)) / "store.db")


def _postgresql_url(request: pytest.FixtureRequest) -> str:
    """A new, empty schema in the session's test database."""
    new_schema: Callable[[], str] = request.getfixturevalue("postgres_store_schemas")
    return new_schema()


# name -> factory: given the asking test's fixture request (through which it reaches the
# fixtures it needs), return the URL of a fresh, empty store. A URL (not an open store) so that
# tests can reopen it and hand it to other processes. Session-scoped fixtures only: the property
# tests call the factory once per example.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], str]] = {
    "postgresql": _postgresql_url,
    "sqlite": _sqlite_url,
}


def postgres_url(dsn: str, schema: str | None = None) -> str:
    """The ``postgresql://`` store URL of libpq DSN ``dsn``, its tables in ``schema`` if given."""
    parts = conninfo_to_dict(dsn)
    host = str(parts.get("host", ""))
    host = f"[{host}]" if ":" in host else quote(host, safe="")
    user = quote(str(parts.get("user", "")), safe="")
    if "password" in parts:
        user += ":" + quote(str(parts["password"]), safe="")
    port = f":{parts['port']}" if "port" in parts else ""
    url = f"postgresql://{user}@{host}{port}/{quote(str(parts.get('dbname', '')), safe='')}"
    return f"{url}?options=-csearch_path%3D{schema}" if schema else url


@pytest.fixture(scope="session")
def postgres_store_schemas(postgres_admin_dsn: str) -> Iterator[Callable[[], str]]:
    """A factory of store URLs, each a new schema in one database made for the session.

    A database per store would cost a CREATE DATABASE per test and per property example; a
    schema costs a millisecond, and the store's ``search_path`` keeps its tables (and its
    migrations) inside it.
    """
    name = f"idlefleet_test_store_{uuid.uuid4().hex[:12]}"
    dsn = create_database(postgres_admin_dsn, name)
    admin = psycopg.connect(dsn, autocommit=True)

    def new_schema() -> str:
        schema = f"t_{uuid.uuid4().hex}"
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        return postgres_url(dsn, schema)

    try:
        yield new_schema
    finally:
        admin.close()
        drop_database(postgres_admin_dsn, name)


@pytest.fixture(params=sorted(BACKENDS))
def store_url(request: pytest.FixtureRequest) -> str:
    return BACKENDS[request.param](request)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with opened(store_url) as s:
        yield s


@contextmanager
def opened(url: str) -> Iterator[Store]:
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


# -- builders ------------------------------------------------------------------------------------

NOW = 1_700_000_000.0
LEASE_SECONDS = 30.0
MODEL = "all-minilm-l6-v2"
LATEST_SCHEMA = max(m.version for m in MIGRATIONS)
_lease_numbers = itertools.count()
ANY: dict[str, Any] = {"purposes": PURPOSES, "data_regions": DATA_REGIONS}
"""lease_unit's consent filter when the test is not about consent: every purpose and region."""


def file_record(file_id: str = "file-1", size: int = 0) -> FileRecord:
    return FileRecord(
        id=file_id, purpose="batch", filename=f"{file_id}.jsonl", bytes=size, created_at=int(NOW)
    )


def batch_record(
    batch_id: str = "batch-1",
    status: str = "in_progress",
    created_at: int = int(NOW),
    **fields: Any,
) -> BatchRecord:
    return BatchRecord(
        id=batch_id,
        input_file_id="file-1",
        endpoint="/v1/embeddings",
        completion_window="24h",
        status=status,
        created_at=created_at,
        expires_at=created_at + 86_400,
        **fields,
    )


def embedding_request(seq: int, custom_id: str, texts: list[str], model: str = MODEL) -> NewRequest:
    """A request to embed ``texts``, as the embeddings workload plans it: its payload is the
    list of texts, its sort key their total length (longest first)."""
    return NewRequest(
        seq=seq,
        custom_id=custom_id,
        model=model,
        options="float",
        payload=texts,
        sort_key=sum(len(t) for t in texts),
    )


def new_request(seq: int, model: str = MODEL) -> NewRequest:
    return embedding_request(seq, f"req-{seq}", [f"text {seq}", f"more ü {seq}"], model)


def invalid_request(seq: int) -> NewRequest:
    """A request that failed validation: it goes straight to the error file."""
    return NewRequest(
        seq=seq,
        custom_id=f"req-{seq}",
        model=MODEL,
        error_status=400,
        error_body={"error": {"message": f"bad line {seq}", "code": "invalid_request"}},
    )


def result(seq: int, tag: int = 0) -> RequestResult:
    """A result whose bytes encode both the request and who computed it (``tag``)."""
    return RequestResult(
        seq=seq, result=struct.pack("<2f", float(seq), float(tag)), token_count=10 + seq
    )


def vehicle_record(
    vehicle_id: str = "car-1",
    models: tuple[str, ...] = (MODEL,),
    now: float = NOW,
    status: str = "idle",
    hardware: dict[str, Any] | None = None,
) -> VehicleRecord:
    return VehicleRecord(
        id=vehicle_id,
        hardware=hardware or {"cpu": "arm64", "ram_gb": 8},
        models=models,
        registered_at=now,
        last_seen=now,
        status=status,
    )


def take(n: int) -> Callable[[int], int]:
    return lambda pending: n


def add_batch(
    store: Store,
    batch_id: str = "batch-1",
    n: int = 6,
    *,
    status: str = "in_progress",
    model: str = MODEL,
    created_at: int = int(NOW),
) -> str:
    store.create_batch(batch_record(batch_id, status, created_at))
    store.add_requests(batch_id, [new_request(seq, model) for seq in range(n)])
    return batch_id


def lease(
    store: Store,
    vehicle_id: str = "car-1",
    size: int = 100,
    *,
    now: float = NOW,
    models: Iterable[str] = (MODEL,),
    unit_size: Callable[[int], int] | None = None,
    purposes: Iterable[str] = PURPOSES,
    data_regions: Iterable[str] = DATA_REGIONS,
) -> Lease | None:
    return store.lease_unit(
        vehicle_id,
        f"lease-{next(_lease_numbers)}",
        list(models),
        now,
        LEASE_SECONDS,
        unit_size or take(size),
        purposes=list(purposes),
        data_regions=list(data_regions),
    )


def must_lease(store: Store, vehicle_id: str = "car-1", size: int = 100, **kw: Any) -> Lease:
    leased = lease(store, vehicle_id, size, **kw)
    assert leased is not None
    return leased


def seqs_of(leased: Lease) -> list[int]:
    return [item.seq for item in leased.items]


def commit(
    store: Store,
    leased: Lease,
    seqs: Iterable[int],
    *,
    tag: int = 0,
    now: float = NOW,
    vehicle_id: str | None = None,
) -> CommitOutcome:
    return store.commit_results(
        vehicle_id or leased.vehicle_id,
        leased.id,
        [result(seq, tag) for seq in seqs],
        now,
        LEASE_SECONDS,
    )


def stored(store: Store, batch_id: str = "batch-1") -> dict[int, StoredRequest]:
    return {r.seq: r for r in store.iter_requests(batch_id)}


# -- files ---------------------------------------------------------------------------------------


def test_put_file_then_get_file_returns_the_record(store: Store) -> None:
    record = file_record(size=5)

    store.put_file(record, [b"hello"])

    assert store.get_file(record.id) == record
    assert b"".join(store.read_file(record.id)) == b"hello"


def test_file_larger_than_a_chunk_streams_back_identical_bytes(store: Store) -> None:
    content = random.Random(7).randbytes(2 * 4 * 1024 * 1024 + 12_345)
    pieces = [content[i : i + 1_000_003] for i in range(0, len(content), 1_000_003)]
    record = file_record(size=len(content))

    store.put_file(record, iter(pieces))
    chunks = list(store.read_file(record.id))

    assert b"".join(chunks) == content
    assert len(chunks) > 1, "a large file must stream in chunks, not as one blob"


def test_empty_file_round_trips(store: Store) -> None:
    store.put_file(file_record(size=0), [])

    assert b"".join(store.read_file("file-1")) == b""


def test_unknown_file_is_none_and_reading_it_raises_key_error(store: Store) -> None:
    assert store.get_file("file-missing") is None
    with pytest.raises(KeyError):
        list(store.read_file("file-missing"))


def test_delete_file_removes_record_and_content(store: Store) -> None:
    store.put_file(file_record("file-1", 3), [b"abc"])
    store.put_file(file_record("file-2", 3), [b"xyz"])

    deleted = store.delete_file("file-1")

    assert deleted is True
    assert store.get_file("file-1") is None
    with pytest.raises(KeyError):
        list(store.read_file("file-1"))
    assert store.delete_file("file-1") is False
    assert b"".join(store.read_file("file-2")) == b"xyz"


def test_a_file_deleted_while_streaming_is_never_silently_truncated(store: Store) -> None:
    content = random.Random(5).randbytes(2 * 4 * 1024 * 1024 + 100)
    store.put_file(file_record(size=len(content)), [content])
    chunks = store.read_file("file-1")
    first = next(chunks)

    store.delete_file("file-1")
    try:
        streamed = first + b"".join(chunks)
        outcome = "complete" if streamed == content else f"{len(streamed)} bytes, no error"
    except KeyError:
        outcome = "error"  # the reader is told that the file is gone: fine too

    assert outcome in ("complete", "error")


# -- batches -------------------------------------------------------------------------------------


def test_create_then_get_batch_round_trips(store: Store) -> None:
    batch = batch_record(status="validating", metadata={"project": "ünïcode", "run": "7"})
    batch = dataclasses.replace(batch, principal="acme", api_key_id="key_123")

    store.create_batch(batch)

    assert store.get_batch(batch.id) == batch
    assert store.get_batch("batch-missing") is None


def test_list_batches_is_newest_first(store: Store) -> None:
    for i in range(5):
        store.create_batch(batch_record(f"batch-{i}", created_at=int(NOW) + i))

    listed = store.list_batches(limit=10)

    assert [b.id for b in listed] == [f"batch-{i}" for i in reversed(range(5))]


def test_list_batches_pages_cover_every_batch_exactly_once(store: Store) -> None:
    ids = [f"batch-{i}" for i in range(7)]
    for i, batch_id in enumerate(ids):
        store.create_batch(batch_record(batch_id, created_at=int(NOW) + i))

    pages: list[list[str]] = []
    after: str | None = None
    while page := store.list_batches(limit=3, after=after):
        pages.append([b.id for b in page])
        after = page[-1].id

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [batch_id for page in pages for batch_id in page] == list(reversed(ids))


def test_batches_with_status_returns_only_those_statuses(store: Store) -> None:
    statuses = ["validating", "in_progress", "cancelling", "completed", "in_progress"]
    for i, status in enumerate(statuses):
        store.create_batch(batch_record(f"batch-{i}", status, created_at=int(NOW) + i))

    found = store.batches_with_status(["in_progress", "cancelling"])

    assert sorted(b.id for b in found) == ["batch-1", "batch-2", "batch-4"]
    assert store.batches_with_status(["expired"]) == []


def test_update_batch_with_wrong_expected_status_changes_nothing(store: Store) -> None:
    store.create_batch(batch_record(status="validating"))
    before = store.get_batch("batch-1")

    updated = store.update_batch(
        "batch-1", ["in_progress", "finalizing"], status="completed", completed_at=int(NOW) + 9
    )

    assert updated is None
    assert store.get_batch("batch-1") == before


def test_update_batch_with_expected_status_applies_every_change(store: Store) -> None:
    store.create_batch(batch_record(status="validating"))
    errors = {"object": "list", "data": [{"code": "invalid_json", "line": 3, "message": "ü"}]}

    updated = store.update_batch(
        "batch-1", ["validating"], status="failed", failed_at=int(NOW) + 5, errors=errors
    )

    assert updated is not None
    assert (updated.status, updated.failed_at, updated.errors) == ("failed", int(NOW) + 5, errors)
    assert store.get_batch("batch-1") == updated


def test_update_batch_is_a_compare_and_set_only_one_transition_wins(store: Store) -> None:
    store.create_batch(batch_record(status="in_progress"))

    first = store.update_batch("batch-1", ["in_progress"], status="finalizing")
    second = store.update_batch("batch-1", ["in_progress"], status="cancelling")

    assert first is not None and first.status == "finalizing"
    assert second is None
    assert store.get_batch("batch-1").status == "finalizing"  # type: ignore[union-attr]


def test_update_batch_of_unknown_batch_is_none(store: Store) -> None:
    assert store.update_batch("batch-missing", ["in_progress"], status="finalizing") is None


@pytest.mark.parametrize("field", ["bogus", "input_file_id", "created_at"])
def test_update_batch_refuses_fields_that_are_not_updatable(store: Store, field: str) -> None:
    store.create_batch(batch_record(status="in_progress"))
    before = store.get_batch("batch-1")

    with pytest.raises(ValueError):
        store.update_batch("batch-1", ["in_progress"], status="finalizing", **{field: "x"})

    assert store.get_batch("batch-1") == before


# -- requests ------------------------------------------------------------------------------------


def test_add_requests_counts_invalid_requests_as_failed(store: Store) -> None:
    store.create_batch(batch_record())
    requests = [new_request(0), invalid_request(1), new_request(2), invalid_request(3)]

    added = store.add_requests("batch-1", requests)

    assert added == 4
    expected = RequestCounts(total=4, completed=0, failed=2, pending=2, leased=0)
    assert store.request_counts("batch-1") == expected
    assert store.get_batch("batch-1").request_counts == expected  # type: ignore[union-attr]
    assert store.request_counts("batch-missing") == RequestCounts()


def test_add_requests_is_atomic(store: Store) -> None:
    store.create_batch(batch_record())

    # The interface names no error type for a duplicate; what matters is that nothing was added.
    with pytest.raises(Exception):  # noqa: B017
        store.add_requests("batch-1", [new_request(0), new_request(1), new_request(0)])

    assert store.request_counts("batch-1").total == 0


def test_iter_requests_returns_every_request_in_seq_order_with_results_and_errors(
    store: Store,
) -> None:
    store.create_batch(batch_record())
    store.add_requests("batch-1", [new_request(2), invalid_request(1), new_request(0)])
    leased = must_lease(store)
    commit(store, leased, [0])

    rows = list(store.iter_requests("batch-1"))

    assert [r.seq for r in rows] == [0, 1, 2]
    done, failed, waiting = rows
    assert (done.state, done.custom_id, done.model, done.options) == (
        "done",
        "req-0",
        MODEL,
        "float",
    )
    assert (done.result, done.token_count) == (result(0).result, 10)
    assert isinstance(done.result, bytes)
    assert (failed.state, failed.error_status) == ("failed", 400)
    assert failed.error_body == invalid_request(1).error_body
    assert failed.result is None
    assert (waiting.state, waiting.result, waiting.error_status) == ("leased", None, None)


def test_iter_requests_of_a_large_batch_yields_each_request_once(store: Store) -> None:
    add_batch(store, n=2_345)

    seqs = [r.seq for r in store.iter_requests("batch-1")]

    assert seqs == list(range(2_345))


# -- lease_unit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["finalizing", "cancelling", "completed", "failed"])
def test_lease_unit_only_leases_batches_in_progress_or_validating(
    store: Store, status: str
) -> None:
    add_batch(store, "batch-other", status=status, created_at=int(NOW))
    add_batch(store, "batch-run", status="in_progress", created_at=int(NOW) + 1)

    leased = must_lease(store)

    assert leased.batch_id == "batch-run"
    assert store.request_counts("batch-other").pending == 6


@pytest.mark.parametrize("later", ["in_progress", "validating"])
def test_lease_unit_leases_a_validating_batch_whose_requests_are_stored(
    store: Store, later: str
) -> None:
    """Requests are stored while the batch validates (largest first) and leased meanwhile;
    among leasable batches, whatever their status, the oldest goes first."""
    add_batch(store, "batch-validating", status="validating", created_at=int(NOW))
    add_batch(store, "batch-later", status=later, created_at=int(NOW) + 1)

    first = must_lease(store, size=6)
    second = must_lease(store, size=6)

    assert (first.batch_id, second.batch_id) == ("batch-validating", "batch-later")


def test_lease_unit_serves_the_oldest_batch_first(store: Store) -> None:
    add_batch(store, "batch-old", n=3, created_at=int(NOW))
    add_batch(store, "batch-new", n=3, created_at=int(NOW) + 1)

    first = must_lease(store, size=3)
    second = must_lease(store, size=3)

    assert (first.batch_id, seqs_of(first)) == ("batch-old", [0, 1, 2])
    assert second.batch_id == "batch-new"


def test_lease_unit_hands_out_the_longest_requests_first(store: Store) -> None:
    store.create_batch(batch_record("batch-len"))
    lengths = [5, 40, 12, 40, 1]
    store.add_requests(
        "batch-len",
        [embedding_request(i, f"r{i}", ["x" * n]) for i, n in enumerate(lengths)],
    )

    first = must_lease(store, size=3)
    second = must_lease(store, size=3)

    assert seqs_of(first) == [1, 3, 2]  # 40, 40 (by seq), 12
    assert seqs_of(second) == [0, 4]


def test_lease_order_is_the_given_sort_key_not_the_payloads_size(store: Store) -> None:
    store.create_batch(batch_record("batch-key"))
    store.add_requests(
        "batch-key",
        [
            NewRequest(seq=i, custom_id=f"r{i}", model=MODEL, payload=["x" * (10 - i)], sort_key=k)
            for i, k in enumerate([1, 7, 3, 7, 0])
        ],
    )

    first = must_lease(store, size=3)
    second = must_lease(store, size=3)

    assert seqs_of(first) == [1, 3, 2]  # 7, 7 (by seq), 3
    assert seqs_of(second) == [0, 4]


def test_lease_unit_describes_the_unit(store: Store) -> None:
    add_batch(store, n=4)

    leased = store.lease_unit("car-7", "lease-x", [MODEL], NOW, LEASE_SECONDS, take(2), **ANY)

    assert leased is not None
    assert (leased.id, leased.batch_id, leased.vehicle_id, leased.model) == (
        "lease-x",
        "batch-1",
        "car-7",
        MODEL,
    )
    assert (leased.deadline, leased.state) == (NOW + LEASE_SECONDS, "active")
    assert leased.endpoint == "/v1/embeddings"
    assert [(i.seq, i.custom_id, i.payload) for i in leased.items] == [
        (0, "req-0", new_request(0).payload),
        (1, "req-1", new_request(1).payload),
    ]
    assert store.request_counts("batch-1") == RequestCounts(total=4, pending=2, leased=2)
    assert store.active_lease_count("batch-1") == 1


def test_unit_size_gets_the_pending_count_and_bounds_the_unit(store: Store) -> None:
    store.create_batch(batch_record())
    store.add_requests("batch-1", [*(new_request(s) for s in range(8)), invalid_request(8)])
    seen: list[int] = []

    def three(pending: int) -> int:
        seen.append(pending)
        return 3

    first = must_lease(store, unit_size=three)
    second = must_lease(store, unit_size=three)
    third = must_lease(store, unit_size=three)

    assert seen == [8, 5, 2]
    assert [len(first.items), len(second.items), len(third.items)] == [3, 3, 2]


def test_lease_unit_filters_by_model_and_one_lease_carries_one_model(store: Store) -> None:
    store.create_batch(batch_record())
    store.add_requests(
        "batch-1", [new_request(s, "model-a" if s % 2 else "model-b") for s in range(6)]
    )

    only_a = must_lease(store, models=["model-a"])
    both = must_lease(store, models=["model-a", "model-b"])

    assert (only_a.model, seqs_of(only_a)) == ("model-a", [1, 3, 5])
    assert (both.model, seqs_of(both)) == ("model-b", [0, 2, 4])
    assert lease(store, models=["model-a", "model-b"]) is None


def test_lease_unit_skips_older_batches_without_work_for_the_models(store: Store) -> None:
    add_batch(store, "batch-a", model="model-a", created_at=int(NOW))
    add_batch(store, "batch-b", model="model-b", created_at=int(NOW) + 1)

    leased = must_lease(store, models=["model-b"])

    assert leased.batch_id == "batch-b"
    assert lease(store, models=["model-c"]) is None


def test_lease_unit_never_hands_out_finished_or_leased_requests(store: Store) -> None:
    add_batch(store, n=6)
    first = must_lease(store, "car-1", size=3)
    commit(store, first, [0])

    second = must_lease(store, "car-2", size=100)

    assert seqs_of(first) == [0, 1, 2]
    assert seqs_of(second) == [3, 4, 5]
    assert lease(store, "car-3") is None


def test_lease_unit_returns_none_when_there_is_nothing_to_do(store: Store) -> None:
    assert lease(store) is None
    store.create_batch(batch_record())
    store.add_requests("batch-1", [invalid_request(0)])
    assert lease(store) is None


def test_lease_unit_is_atomic_when_unit_size_raises(store: Store) -> None:
    add_batch(store, n=4)

    def broken(pending: int) -> int:
        raise RuntimeError("planner bug")

    with pytest.raises(RuntimeError):
        store.lease_unit("car-1", "lease-x", [MODEL], NOW, LEASE_SECONDS, broken, **ANY)

    assert store.request_counts("batch-1") == RequestCounts(total=4, pending=4)
    assert store.active_lease_count("batch-1") == 0
    retry = store.lease_unit("car-1", "lease-x", [MODEL], NOW, LEASE_SECONDS, take(4), **ANY)
    assert retry is not None and seqs_of(retry) == [0, 1, 2, 3]


def test_concurrent_leasing_from_threads_never_hands_a_request_out_twice(store: Store) -> None:
    add_batch(store, "batch-1", n=120, created_at=int(NOW))
    add_batch(store, "batch-2", n=120, created_at=int(NOW) + 1)
    start = threading.Barrier(8)
    got: list[list[tuple[str, int]]] = [[] for _ in range(8)]

    def vehicle(i: int) -> None:
        start.wait(timeout=10)
        while (leased := lease(store, f"car-{i}", size=3)) is not None:
            got[i].extend((leased.batch_id, seq) for seq in seqs_of(leased))

    threads = [threading.Thread(target=vehicle, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    handed_out = [pair for per_thread in got for pair in per_thread]
    assert len(handed_out) == len(set(handed_out)) == 240
    assert store.request_counts("batch-1").leased == store.request_counts("batch-2").leased == 120


def _lease_until_empty(url: str, vehicle_id: str, start: Any, out: Any) -> None:
    """Child process: a coordinator replica leasing until the queue is empty."""
    try:
        with opened(url) as replica:
            start.wait(timeout=30)
            got: list[tuple[str, int]] = []
            for n in itertools.count():
                leased = replica.lease_unit(
                    vehicle_id, f"{vehicle_id}-lease-{n}", [MODEL], NOW, 3_600.0, take(2), **ANY
                )
                if leased is None:
                    break
                got.extend((leased.batch_id, item.seq) for item in leased.items)
        out.put(got)
    except BaseException as exc:  # report it to the test instead of leaving it waiting
        out.put(f"{vehicle_id} failed: {exc!r}")
        raise


def test_concurrent_leasing_from_processes_never_hands_a_request_out_twice(
    store: Store, store_url: str
) -> None:
    add_batch(store, n=300)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    replicas = [
        ctx.Process(target=_lease_until_empty, args=(store_url, f"car-{i}", start, out))
        for i in range(2)
    ]
    for p in replicas:
        p.start()

    results = [out.get(timeout=60) for _ in replicas]
    for p in replicas:
        p.join(timeout=30)

    assert all(isinstance(r, list) for r in results), results
    assert [p.exitcode for p in replicas] == [0, 0]
    handed_out = [pair for per_replica in results for pair in per_replica]
    assert len(handed_out) == len(set(handed_out)) == 300
    assert store.request_counts("batch-1") == RequestCounts(total=300, leased=300)


# -- commit_results ------------------------------------------------------------------------------


def test_commit_results_stores_the_results(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)

    outcome = commit(store, leased, [0, 2], now=NOW + 1)

    assert (outcome.committed, outcome.duplicates, outcome.unknown_lease) == (2, 0, False)
    rows = stored(store)
    assert [rows[s].state for s in range(3)] == ["done", "leased", "done"]
    assert rows[2].result == result(2).result
    assert store.request_counts("batch-1") == RequestCounts(total=3, completed=2, leased=1)


def test_commit_results_is_idempotent_and_the_first_result_wins(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)
    commit(store, leased, [0, 1], tag=1)

    again = commit(store, leased, [0, 1], tag=2, now=NOW + 1)

    assert (again.committed, again.duplicates) == (0, 2)
    rows = stored(store)
    assert [rows[0].result, rows[1].result] == [result(0, 1).result, result(1, 1).result]
    assert store.request_counts("batch-1").completed == 2


def test_a_repeated_result_within_one_commit_counts_as_a_duplicate(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store)

    outcome = store.commit_results(
        "car-1", leased.id, [result(0, 1), result(0, 2)], NOW, LEASE_SECONDS
    )

    assert (outcome.committed, outcome.duplicates) == (1, 1)
    assert stored(store)[0].result == result(0, 1).result


def test_commit_from_a_vehicle_that_does_not_own_the_lease_commits_nothing(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1")

    outcome = commit(store, leased, [0, 1], vehicle_id="car-2")

    assert outcome.unknown_lease is True
    assert (outcome.committed, outcome.lease_active, outcome.deadline) == (0, False, None)
    assert store.request_counts("batch-1") == RequestCounts(total=2, leased=2)


def test_commit_to_an_unknown_lease_is_refused(store: Store) -> None:
    add_batch(store, n=2)
    must_lease(store)

    outcome = store.commit_results("car-1", "lease-missing", [result(0)], NOW, LEASE_SECONDS)

    assert outcome.unknown_lease is True
    assert store.request_counts("batch-1").completed == 0


def test_results_for_requests_not_in_the_lease_are_ignored(store: Store) -> None:
    add_batch(store, n=6)
    mine = must_lease(store, "car-1", size=2)
    theirs = must_lease(store, "car-2", size=2)

    outcome = commit(store, mine, [0, 2, 4, 99])

    assert (outcome.committed, outcome.duplicates) == (1, 0)
    rows = stored(store)
    assert [rows[s].state for s in range(6)] == ["done", "leased", "leased", "leased"] + [
        "pending"
    ] * 2
    assert commit(store, theirs, [2]).committed == 1


@pytest.mark.parametrize("ending", ["expired", "released"])
def test_a_late_commit_is_accepted_and_not_leased_again(store: Store, ending: str) -> None:
    add_batch(store, n=4)
    late = must_lease(store, "car-1")
    if ending == "expired":
        assert store.expire_leases(NOW + LEASE_SECONDS + 1) == 4
    else:
        assert store.release_lease("car-1", late.id, NOW + 1) == 4

    outcome = commit(store, late, [0, 1], now=NOW + LEASE_SECONDS + 2)
    relet = must_lease(store, "car-2", now=NOW + LEASE_SECONDS + 3)

    assert (outcome.committed, outcome.duplicates) == (2, 0)
    assert (outcome.lease_active, outcome.deadline) == (False, None)
    assert seqs_of(relet) == [2, 3]
    assert store.vehicle_usage("batch-1") == {"car-1": 2}


def test_a_late_commit_after_the_request_finished_elsewhere_is_a_duplicate(store: Store) -> None:
    add_batch(store, n=2)
    late = must_lease(store, "car-1")
    later = NOW + LEASE_SECONDS + 1
    store.expire_leases(later)
    relet = must_lease(store, "car-2", now=later)
    commit(store, relet, [0, 1], tag=2, now=later)

    outcome = commit(store, late, [0], tag=1, now=later + 1)

    assert (outcome.committed, outcome.duplicates) == (0, 1)
    assert stored(store)[0].result == result(0, 2).result
    assert store.vehicle_usage("batch-1") == {"car-2": 2}


def test_a_late_commit_before_the_new_holder_finishes_wins(store: Store) -> None:
    add_batch(store, n=2)
    late = must_lease(store, "car-1")
    later = NOW + LEASE_SECONDS + 1
    store.expire_leases(later)
    relet = must_lease(store, "car-2", now=later)

    from_late = commit(store, late, [0], tag=1, now=later + 1)
    from_new = commit(store, relet, [0, 1], tag=2, now=later + 2)

    assert (from_late.committed, from_new.committed, from_new.duplicates) == (1, 1, 1)
    rows = stored(store)
    assert (rows[0].result, rows[1].result) == (result(0, 1).result, result(1, 2).result)
    assert store.vehicle_usage("batch-1") == {"car-1": 1, "car-2": 1}


def test_commit_extends_an_active_lease(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)

    outcome = commit(store, leased, [0], now=NOW + 20)

    assert (outcome.lease_active, outcome.deadline) == (True, NOW + 20 + LEASE_SECONDS)
    assert store.expire_leases(NOW + LEASE_SECONDS + 5) == 0
    assert store.active_lease_count("batch-1") == 1
    assert store.expire_leases(NOW + 20 + LEASE_SECONDS + 1) == 2


def test_a_lease_finishes_once_all_its_items_are_done(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)
    commit(store, leased, [0, 1])
    assert store.active_lease_count("batch-1") == 1

    commit(store, leased, [2], now=NOW + 1)

    assert store.active_lease_count("batch-1") == 0
    assert store.expire_leases(NOW + 10_000) == 0
    assert store.release_lease("car-1", leased.id, NOW + 2) == 0
    assert store.request_counts("batch-1") == RequestCounts(total=3, completed=3)


def test_concurrent_commits_of_the_same_requests_commit_each_once(store: Store) -> None:
    add_batch(store, n=50)
    first = must_lease(store, "car-1")
    later = NOW + LEASE_SECONDS + 1
    store.expire_leases(later)
    second = must_lease(store, "car-2", now=later)
    start = threading.Barrier(2)
    outcomes: dict[int, CommitOutcome] = {}

    def send(tag: int, leased: Lease) -> None:
        start.wait(timeout=10)
        outcomes[tag] = commit(store, leased, range(50), tag=tag, now=later)

    threads = [threading.Thread(target=send, args=a) for a in ((1, first), (2, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert outcomes[1].committed + outcomes[2].committed == 50
    assert outcomes[1].duplicates + outcomes[2].duplicates == 50
    tags = Counter(struct.unpack("<2f", r.result or b"")[1] for r in store.iter_requests("batch-1"))
    assert tags == Counter({1.0: outcomes[1].committed, 2.0: outcomes[2].committed}) - Counter()


# -- get_lease / list_leases -----------------------------------------------------------------------


def test_get_lease_describes_the_lease_to_its_holder_only(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store, "car-1", size=2)

    got = store.get_lease("car-1", leased.id)

    assert got == replace(leased, items=())
    assert store.get_lease("car-2", leased.id) is None
    assert store.get_lease("car-1", "lease-missing") is None


def test_get_lease_shows_the_extended_deadline(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)

    commit(store, leased, [0], now=NOW + 20)

    got = store.get_lease("car-1", leased.id)
    assert got is not None and (got.state, got.deadline) == ("active", NOW + 20 + LEASE_SECONDS)


def _finish(store: Store, leased: Lease) -> None:
    commit(store, leased, seqs_of(leased), now=NOW + 1)


def _release(store: Store, leased: Lease) -> None:
    store.release_lease(leased.vehicle_id, leased.id, NOW + 1)


def _expire(store: Store, leased: Lease) -> None:
    store.expire_leases(leased.deadline + 1)


@pytest.mark.parametrize(
    ("end", "state"), [(_finish, "finished"), (_release, "released"), (_expire, "expired")]
)
def test_get_lease_tells_how_the_lease_ended(
    store: Store, end: Callable[[Store, Lease], None], state: str
) -> None:
    add_batch(store, n=3)
    leased = must_lease(store, size=2)

    end(store, leased)

    got = store.get_lease("car-1", leased.id)
    assert got is not None and got.state == state
    assert store.active_lease_count("batch-1") == 0


def test_list_leases_lists_leases_newest_first(store: Store) -> None:
    add_batch(store, n=6)
    first = must_lease(store, "car-1", size=2, now=NOW)
    second = must_lease(store, "car-2", size=2, now=NOW + 1)
    third = must_lease(store, "car-3", size=2, now=NOW + 2)
    commit(store, second, [2, 3], now=NOW + 3)

    active = store.list_leases()
    every = store.list_leases(active_only=False)

    assert [le.id for le in active] == [third.id, first.id]
    assert [(le.id, le.state) for le in every] == [
        (third.id, "active"),
        (second.id, "finished"),
        (first.id, "active"),
    ]
    assert every[0] == replace(third, items=())
    assert [le.id for le in store.list_leases(active_only=False, limit=2)] == [third.id, second.id]
    assert store.list_leases(limit=1) == [replace(third, items=())]


# -- returning, releasing, expiring, abandoning ----------------------------------------------------


def test_return_requests_puts_only_those_back(store: Store) -> None:
    add_batch(store, n=4)
    leased = must_lease(store, "car-1")
    commit(store, leased, [0])

    returned = store.return_requests("car-1", leased.id, [0, 1, 2, 42])

    assert returned == 2
    assert store.request_counts("batch-1") == RequestCounts(
        total=4, completed=1, pending=2, leased=1
    )
    assert store.active_lease_count("batch-1") == 1
    assert seqs_of(must_lease(store, "car-2")) == [1, 2]


def test_return_requests_of_another_vehicle_returns_nothing(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1")

    assert store.return_requests("car-2", leased.id, [0, 1]) == 0
    assert store.request_counts("batch-1").leased == 2


def test_release_lease_puts_unfinished_requests_back(store: Store) -> None:
    add_batch(store, n=4)
    leased = must_lease(store)
    commit(store, leased, [0])

    returned = store.release_lease("car-1", leased.id, NOW + 1)

    assert returned == 3
    assert store.request_counts("batch-1") == RequestCounts(total=4, completed=1, pending=3)
    assert store.active_lease_count("batch-1") == 0
    assert stored(store)[0].result == result(0).result
    assert store.release_lease("car-1", leased.id, NOW + 2) == 0


def test_release_of_an_unknown_lease_is_none(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1")

    assert store.release_lease("car-1", "lease-missing", NOW) is None
    assert store.release_lease("car-2", leased.id, NOW) is None
    assert store.request_counts("batch-1").leased == 2


def test_expire_leases_ends_only_leases_past_their_deadline(store: Store) -> None:
    add_batch(store, n=5)
    early = must_lease(store, "car-1", size=2, now=NOW)
    must_lease(store, "car-2", size=3, now=NOW + 20)

    at_deadline = store.expire_leases(early.deadline)
    past_deadline = store.expire_leases(early.deadline + 1)

    assert (at_deadline, past_deadline) == (0, 2)
    assert store.active_lease_count("batch-1") == 1
    assert store.request_counts("batch-1") == RequestCounts(total=5, pending=2, leased=3)
    assert seqs_of(must_lease(store, "car-3", now=early.deadline + 1)) == [0, 1]


def test_abandon_unfinished_fails_pending_and_leased_but_keeps_done(store: Store) -> None:
    store.create_batch(batch_record())
    store.add_requests("batch-1", [*(new_request(s) for s in range(5)), invalid_request(5)])
    leased = must_lease(store, size=4)
    commit(store, leased, [0, 1])
    body = {"error": {"code": "batch_cancelled", "message": "cancelled"}}

    abandoned = store.abandon_unfinished("batch-1", 400, body)

    assert abandoned == 3
    rows = stored(store)
    assert [rows[s].state for s in range(6)] == ["done"] * 2 + ["failed"] * 4
    assert rows[0].result == result(0).result
    assert [(rows[s].error_status, rows[s].error_body) for s in (2, 3, 4)] == [(400, body)] * 3
    assert rows[5].error_body == invalid_request(5).error_body
    assert store.request_counts("batch-1") == RequestCounts(total=6, completed=2, failed=4)
    assert store.active_lease_count("batch-1") == 0
    assert lease(store) is None
    late = commit(store, leased, [2, 3], now=NOW + 1)
    assert (late.committed, late.duplicates) == (0, 2)


# -- vehicles ------------------------------------------------------------------------------------


def test_upsert_vehicle_registers_then_updates(store: Store) -> None:
    store.upsert_vehicle(vehicle_record("car-1"))
    store.upsert_vehicle(vehicle_record("car-2"))

    store.upsert_vehicle(
        vehicle_record(
            "car-1", models=("m1", "m2"), now=NOW + 5, status="charging", hardware={"x": 1}
        )
    )

    car = store.get_vehicle("car-1")
    assert car is not None
    assert (car.hardware, car.models, car.last_seen, car.status) == (
        {"x": 1},
        ("m1", "m2"),
        NOW + 5,
        "charging",
    )
    assert sorted(v.id for v in store.list_vehicles()) == ["car-1", "car-2"]
    assert store.get_vehicle("car-missing") is None


def test_touch_vehicle_records_a_heartbeat(store: Store) -> None:
    store.upsert_vehicle(vehicle_record("car-1"))

    touched = store.touch_vehicle("car-1", NOW + 7, "working")

    assert touched is True
    car = store.get_vehicle("car-1")
    assert car is not None and (car.last_seen, car.status) == (NOW + 7, "working")
    assert store.touch_vehicle("car-missing", NOW + 7, "working") is False
    assert store.get_vehicle("car-missing") is None


def test_vehicles_count_their_completed_requests_and_usage_is_per_batch(store: Store) -> None:
    store.upsert_vehicle(vehicle_record("car-1"))
    store.upsert_vehicle(vehicle_record("car-2"))
    store.upsert_vehicle(vehicle_record("car-3"))
    add_batch(store, "batch-1", n=5, created_at=int(NOW))
    add_batch(store, "batch-2", n=2, created_at=int(NOW) + 1)
    one = must_lease(store, "car-1", size=3)
    two = must_lease(store, "car-2", size=2)
    three = must_lease(store, "car-1", size=2)
    commit(store, one, [0, 1, 2])
    commit(store, two, [3, 4])
    commit(store, three, [0])

    counts = {v.id: v.completed_requests for v in store.list_vehicles()}

    assert three.batch_id == "batch-2"
    assert counts == {"car-1": 4, "car-2": 2, "car-3": 0}
    assert store.get_vehicle("car-1").completed_requests == 4  # type: ignore[union-attr]
    assert store.vehicle_usage("batch-1") == {"car-1": 3, "car-2": 2}
    assert store.vehicle_usage("batch-2") == {"car-1": 1}


# -- durability and migrations -------------------------------------------------------------------


def _schema_version(store: Store) -> int:
    version = getattr(store, "schema_version", None)
    if version is None:
        pytest.skip(f"{type(store).__name__} does not report a schema version")
    return int(version())


def test_everything_returned_survives_close_and_reopen(store_url: str) -> None:
    content = random.Random(3).randbytes(5 * 1024 * 1024)
    with opened(store_url) as first:
        first.put_file(file_record(size=len(content)), [content])
        first.create_batch(batch_record(metadata={"k": "v"}))
        first.add_requests("batch-1", [*(new_request(s) for s in range(4)), invalid_request(4)])
        first.upsert_vehicle(vehicle_record("car-1"))
        leased = must_lease(first, "car-1", size=3)
        commit(first, leased, [0])
        first.update_batch("batch-1", ["in_progress"], errors=[{"code": "x"}])

    with opened(store_url) as second:
        assert second.get_file("file-1") == file_record(size=len(content))
        assert b"".join(second.read_file("file-1")) == content
        batch = second.get_batch("batch-1")
        assert batch is not None
        assert (batch.metadata, batch.errors) == ({"k": "v"}, [{"code": "x"}])
        assert batch.request_counts == RequestCounts(
            total=5, completed=1, failed=1, pending=1, leased=2
        )
        assert stored(second)[0].result == result(0).result
        assert second.active_lease_count("batch-1") == 1
        assert second.get_lease("car-1", leased.id) == replace(leased, items=())
        resumed = commit(second, leased, [1, 2], now=NOW + 1)
        assert (resumed.committed, resumed.lease_active) == (2, True)
        assert second.get_vehicle("car-1").completed_requests == 3  # type: ignore[union-attr]


def test_a_fresh_store_is_at_the_latest_migration(store: Store) -> None:
    assert _schema_version(store) == LATEST_SCHEMA


def test_reopening_does_not_reapply_migrations(store_url: str) -> None:
    with opened(store_url) as first:
        add_batch(first, n=3)

    versions = []
    for _ in range(3):
        with opened(store_url) as again:
            versions.append(_schema_version(again))
            assert [b.id for b in again.list_batches(10)] == ["batch-1"]
            assert again.request_counts("batch-1").total == 3

    assert versions == [LATEST_SCHEMA] * 3


def test_migration_versions_are_consecutive_from_one() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


# -- property: random lease / commit / return / release / expire ---------------------------------

N_REQUESTS = 8  # plus one more that failed validation (seq N_REQUESTS)
VEHICLES = ("car-1", "car-2", "car-3")

# A request is named by a "pick": 0-5 is an item of the chosen lease (modulo its size), 6 a
# request of the batch outside the lease, 7 the request that failed validation, 8 a seq that does
# not exist. Most picks hit the lease, so repeated and late commits are common.
_picks = st.lists(st.integers(0, 8), max_size=5)
_lease_index = st.integers(0, 3)  # 0 is the newest lease, 1 the one before, ...
_OPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "lease": st.tuples(st.just("lease"), st.sampled_from(VEHICLES), st.integers(1, 4)),
    "commit": st.tuples(
        st.just("commit"), _lease_index, _picks, st.sampled_from((False,) * 5 + (True,))
    ),
    "return": st.tuples(st.just("return"), _lease_index, _picks),
    "release": st.tuples(st.just("release"), _lease_index, st.sampled_from((False,) * 3 + (True,))),
    # Clock steps around the lease length, so deadlines are met exactly, just before and after.
    "expire": st.tuples(st.just("expire"), st.sampled_from((0, 29, 30, 31))),
    "tick": st.tuples(st.just("tick"), st.sampled_from((1, 5, 10, 29, 30, 31))),
}
# Weighted towards leasing and committing, where the guarantees are.
_KINDS = ("lease",) * 2 + ("commit",) * 3 + ("return", "release", "expire", "tick")
_op = st.sampled_from(_KINDS).flatmap(_OPS.__getitem__)


@dataclass
class _LeaseModel:
    vehicle_id: str
    seqs: tuple[int, ...]
    active: bool
    deadline: float


class _Reference:
    """The contract, executed on plain dicts, next to the store under test."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.now = NOW
        self.state = {seq: "pending" for seq in range(N_REQUESTS)} | {N_REQUESTS: "failed"}
        self.holder: dict[int, str | None] = dict.fromkeys(self.state)
        self.leases: dict[str, _LeaseModel] = {}
        self.first: dict[int, bytes] = {}
        self.accepted: Counter[int] = Counter()
        self.attempts: Counter[int] = Counter()
        """Failed attempts per request: expired, returned as failed (``Store.max_attempts``)."""
        self.commit_tags = itertools.count(1)
        store.create_batch(batch_record())
        store.add_requests(
            "batch-1", [*(new_request(s) for s in range(N_REQUESTS)), invalid_request(N_REQUESTS)]
        )

    def _pending(self) -> list[int]:
        return [seq for seq, state in self.state.items() if state == "pending"]

    def _held_by(self, lease_id: str) -> list[int]:
        return [
            s for s, st_ in self.state.items() if st_ == "leased" and self.holder[s] == lease_id
        ]

    def _close_if_finished(self, lease_id: str) -> None:
        if not self._held_by(lease_id):
            self.leases[lease_id].active = False

    def _seqs(self, lease_id: str, picks: list[int]) -> list[int]:
        held = self.leases[lease_id].seqs
        outside = [seq for seq in range(N_REQUESTS) if seq not in held]
        named = {6: outside[0] if outside else N_REQUESTS, 7: N_REQUESTS, 8: N_REQUESTS + 1}
        return [held[p % len(held)] if p < 6 else named[p] for p in picks]

    def _pick(self, index: int) -> str | None:
        ids = list(self.leases)
        return ids[-1 - index % len(ids)] if ids else None

    def lease(self, vehicle_id: str, size: int) -> Lease | None:
        pending = self._pending()
        seen: list[int] = []
        lease_id = f"lease-{len(self.leases)}"

        def unit(n: int) -> int:
            seen.append(n)
            return size

        got = self.store.lease_unit(
            vehicle_id, lease_id, [MODEL], self.now, LEASE_SECONDS, unit, **ANY
        )

        if not pending:
            assert got is None
            return None
        assert got is not None and seen == [len(pending)]
        seqs = seqs_of(got)
        assert len(seqs) == len(set(seqs)) == min(size, len(pending))
        assert set(seqs) <= set(pending), "leased a request that is finished or actively leased"
        assert got.deadline == self.now + LEASE_SECONDS
        for seq in seqs:
            self.state[seq], self.holder[seq] = "leased", lease_id
        self.leases[lease_id] = _LeaseModel(vehicle_id, tuple(seqs), True, got.deadline)
        return got

    def commit(self, lease_id: str, seqs: list[int], wrong_vehicle: bool) -> None:
        held = self.leases[lease_id]
        tag = next(self.commit_tags)
        results = [result(seq, tag) for seq in seqs]
        vehicle_id = "car-stranger" if wrong_vehicle else held.vehicle_id

        outcome = self.store.commit_results(vehicle_id, lease_id, results, self.now, LEASE_SECONDS)

        if wrong_vehicle:
            assert outcome.unknown_lease and outcome.committed == 0
            return
        mine = [r for r in results if r.seq in held.seqs]
        accepted = 0
        others: set[str] = set()
        for r in mine:
            if self.state[r.seq] in ("pending", "leased"):
                if self.holder[r.seq] not in (None, lease_id):
                    others.add(self.holder[r.seq])
                self.state[r.seq], self.holder[r.seq] = "done", None
                self.first[r.seq] = r.result
                self.accepted[r.seq] += 1
                accepted += 1
        assert (outcome.committed, outcome.duplicates) == (accepted, len(mine) - accepted)
        assert not outcome.unknown_lease
        assert outcome.lease_active == held.active
        if held.active:
            assert outcome.deadline == self.now + LEASE_SECONDS
            held.deadline = self.now + LEASE_SECONDS
            self._close_if_finished(lease_id)
        # A late answer that finishes another car's last open requests closes that lease too.
        for other in others:
            if self.leases[other].active:
                self._close_if_finished(other)

    def return_(self, lease_id: str, seqs: frozenset[int]) -> None:
        held = self.leases[lease_id]
        expected = 0
        if held.active:
            back = [s for s in seqs if self.state.get(s) == "leased" and self.holder[s] == lease_id]
            expected = self._requeue(back, failed=True)

        returned = self.store.return_requests(held.vehicle_id, lease_id, seqs)

        assert returned == expected
        if held.active:
            self._close_if_finished(lease_id)

    def release(self, lease_id: str, wrong_vehicle: bool) -> None:
        held = self.leases[lease_id]
        vehicle_id = "car-stranger" if wrong_vehicle else held.vehicle_id

        returned = self.store.release_lease(vehicle_id, lease_id, self.now)

        if wrong_vehicle:
            assert returned is None
            return
        expected = self._end(lease_id, failed=False) if held.active else 0  # no reason given
        assert returned == expected

    def _end(self, lease_id: str, failed: bool) -> int:
        self.leases[lease_id].active = False
        return self._requeue(self._held_by(lease_id), failed)

    def _requeue(self, seqs: list[int], failed: bool) -> int:
        """Back to the queue, or (a failed attempt, the last allowed) failed for good."""
        back = 0
        for seq in seqs:
            self.attempts[seq] += failed
            if self.attempts[seq] >= self.store.max_attempts:
                self.state[seq], self.holder[seq] = "failed", None
            else:
                self.state[seq], self.holder[seq] = "pending", None
                back += 1
        return back

    def expire(self) -> None:
        due = [i for i, h in self.leases.items() if h.active and h.deadline < self.now]
        expected = sum(self._end(lease_id, failed=True) for lease_id in due)

        assert self.store.expire_leases(self.now) == expected

    def check(self) -> None:
        counts = self.store.request_counts("batch-1")
        by_state = Counter(self.state.values())
        assert counts == RequestCounts(
            total=N_REQUESTS + 1,
            completed=by_state["done"],
            failed=by_state["failed"],
            pending=by_state["pending"],
            leased=by_state["leased"],
        )
        assert counts.completed + counts.failed + counts.unfinished == counts.total
        active = {lease_id for lease_id, h in self.leases.items() if h.active}
        assert self.store.active_lease_count("batch-1") == len(active)
        assert {le.id for le in self.store.list_leases()} == active
        for row in self.store.iter_requests("batch-1"):
            assert row.state == self.state[row.seq]
            assert row.result == self.first.get(row.seq)

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "lease":
            self.lease(op[1], op[2])
        elif kind == "tick":
            self.now += op[1]
        elif kind == "expire":
            self.now += op[1]
            self.expire()
        elif (lease_id := self._pick(op[1])) is None:
            return
        elif kind == "commit":
            self.commit(lease_id, self._seqs(lease_id, op[2]), op[3])
        elif kind == "return":
            self.return_(lease_id, frozenset(self._seqs(lease_id, op[2])))
        elif kind == "release":
            self.release(lease_id, op[2])
        self.check()

    def drain(self) -> None:
        """Expire what is left and work the queue dry with fresh leases."""
        self.now += 10_000
        self.expire()
        while (got := self.lease(VEHICLES[0], 3)) is not None:
            self.commit(got.id, seqs_of(got), wrong_vehicle=False)
        self.check()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@settings(max_examples=150, deadline=None, database=None)
@given(ops=st.lists(_op, min_size=5, max_size=40))
def test_random_lease_histories_commit_every_request_exactly_once(
    backend: str, ops: list[tuple[Any, ...]], request: pytest.FixtureRequest
) -> None:
    with opened(BACKENDS[backend](request)) as s:
        reference = _Reference(s)

        for op in ops:
            reference.apply(op)
        reference.drain()

        # Every request ends once: committed exactly once, or failed after its last attempt.
        exhausted = {q for q in range(N_REQUESTS) if reference.attempts[q] >= s.max_attempts}
        assert reference.accepted == Counter(set(range(N_REQUESTS)) - exhausted)
        rows = stored(s)
        assert all(rows[seq].state == "done" for seq in set(range(N_REQUESTS)) - exhausted)
        assert all(rows[seq].state == "failed" for seq in exhausted)
        assert rows[N_REQUESTS].state == "failed"
        assert {seq: rows[seq].result for seq in range(N_REQUESTS) if seq not in exhausted} == (
            reference.first
        )
        assert s.active_lease_count("batch-1") == 0


def test_commit_says_when_it_finished_the_lease(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store, size=3)

    partial = commit(store, leased, [0, 1])
    again = commit(store, leased, [0, 1])
    last = commit(store, leased, [2])

    assert not partial.lease_finished and partial.lease_active
    assert not again.lease_finished
    assert last.lease_finished and store.active_lease_count("batch-1") == 0


# -- purpose and data region (owner consent) -----------------------------------------------------


def add_tagged_batch(
    store: Store, batch_id: str, purpose: str, data_region: str, n: int = 3, created_at: int = 0
) -> str:
    store.create_batch(
        batch_record(
            batch_id,
            created_at=created_at or int(NOW),
            purpose=purpose,
            data_region=data_region,
        )
    )
    store.add_requests(batch_id, [new_request(seq) for seq in range(n)])
    return batch_id


def test_a_batch_keeps_its_purpose_and_data_region(store: Store) -> None:
    store.create_batch(batch_record("batch-r", purpose="research", data_region="eu"))
    store.create_batch(batch_record("batch-d"))

    tagged = store.get_batch("batch-r")
    plain = store.get_batch("batch-d")

    assert tagged is not None and (tagged.purpose, tagged.data_region) == ("research", "eu")
    assert plain is not None and (plain.purpose, plain.data_region) == ("general", "global")
    assert {b.id: b.purpose for b in store.list_batches(10)} == {
        "batch-r": "research",
        "batch-d": "general",
    }


def test_lease_unit_skips_batches_whose_purpose_or_region_is_not_allowed(store: Store) -> None:
    add_tagged_batch(store, "batch-ads", "advertising", "global", created_at=int(NOW))
    add_tagged_batch(store, "batch-eu", "general", "eu", created_at=int(NOW) + 1)
    add_tagged_batch(store, "batch-ok", "research", "global", created_at=int(NOW) + 2)
    no_ads = [p for p in PURPOSES if p != "advertising"]

    first = must_lease(store, size=2, purposes=no_ads, data_regions=["global", "us"])
    second = must_lease(store, size=2, purposes=no_ads, data_regions=["global", "us"])
    exhausted = lease(store, purposes=no_ads, data_regions=["global", "us"])
    eu = must_lease(store, purposes=["general"], data_regions=["eu"])

    assert [first.batch_id, second.batch_id] == ["batch-ok", "batch-ok"]
    assert (first.purpose, first.data_region) == ("research", "global")
    assert exhausted is None
    assert (eu.batch_id, eu.purpose, eu.data_region) == ("batch-eu", "general", "eu")
    assert store.request_counts("batch-ads").pending == 3
    assert store.get_lease("car-1", eu.id) == replace(eu, items=())


def test_lease_unit_with_nothing_allowed_leases_nothing(store: Store) -> None:
    add_batch(store, n=3)

    assert lease(store, purposes=[]) is None
    assert lease(store, data_regions=[]) is None
    assert store.request_counts("batch-1").pending == 3


_COMBOS = [(p, r) for p in ("general", "research", "advertising") for r in ("global", "eu", "us")]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@settings(max_examples=25, deadline=None, database=None)
@given(
    purposes=st.sets(st.sampled_from(["general", "research", "advertising"])),
    regions=st.sets(st.sampled_from(["global", "eu", "us"])),
    order=st.permutations(_COMBOS),
)
def test_lease_unit_never_leases_a_batch_the_owner_does_not_allow(
    backend: str,
    purposes: set[str],
    regions: set[str],
    order: list[tuple[str, str]],
    request: pytest.FixtureRequest,
) -> None:
    with opened(BACKENDS[backend](request)) as s:
        for i, (purpose, region) in enumerate(order):
            add_tagged_batch(s, f"b-{purpose}-{region}", purpose, region, 2, int(NOW) + i)

        leased_from: list[str] = []
        while (got := lease(s, size=1, purposes=purposes, data_regions=regions)) is not None:
            leased_from.append(got.batch_id)
            assert (got.purpose, got.data_region) in {(p, r) for p in purposes for r in regions}

        allowed = [f"b-{p}-{r}" for p, r in order if p in purposes and r in regions]
        # Every allowed batch is drained, oldest first, and nothing else was touched.
        assert leased_from == [b for b in allowed for _ in range(2)]
        for p, r in order:
            pending = s.request_counts(f"b-{p}-{r}").pending
            assert pending == (0 if f"b-{p}-{r}" in allowed else 2)


# -- energy and end reasons of leases ------------------------------------------------------------


def _energy(store: Store, leased: Lease) -> float:
    got = store.get_lease(leased.vehicle_id, leased.id)
    assert got is not None
    return got.energy_j


def test_commit_results_adds_the_chunks_energy_to_the_lease(store: Store) -> None:
    add_batch(store, n=4)
    leased = must_lease(store)

    store.commit_results("car-1", leased.id, [result(0)], NOW, LEASE_SECONDS, energy_j=1.5)
    store.commit_results("car-1", leased.id, [result(0)], NOW, LEASE_SECONDS, energy_j=2.25)
    store.commit_results("car-1", leased.id, [], NOW, LEASE_SECONDS)

    assert _energy(store, leased) == 3.75
    assert store.list_leases()[0].energy_j == 3.75


def test_energy_of_a_late_chunk_counts_but_never_on_someone_elses_lease(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1")
    store.expire_leases(NOW + LEASE_SECONDS + 1)

    late = store.commit_results("car-1", leased.id, [result(0)], NOW + 40, 30, energy_j=5.0)
    stolen = store.commit_results("car-2", leased.id, [result(1)], NOW + 40, 30, energy_j=7.0)
    unknown = store.commit_results("car-1", "lease-missing", [], NOW + 40, 30, energy_j=9.0)

    assert (late.committed, stolen.unknown_lease, unknown.unknown_lease) == (1, True, True)
    assert _energy(store, leased) == 5.0


@pytest.mark.parametrize("energy", [-1.0, float("nan"), float("inf")])
def test_impossible_energy_is_refused_and_changes_nothing(store: Store, energy: float) -> None:
    add_batch(store, n=2)
    leased = must_lease(store)

    with pytest.raises(ValueError):
        store.commit_results("car-1", leased.id, [result(0)], NOW, LEASE_SECONDS, energy_j=energy)
    with pytest.raises(ValueError):
        store.release_lease("car-1", leased.id, NOW, "shutdown", energy_j=energy)

    assert store.request_counts("batch-1") == RequestCounts(total=2, leased=2)
    assert _energy(store, leased) == 0.0


def test_release_records_its_reason_and_energy(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store)
    commit(store, leased, [0])

    returned = store.release_lease("car-1", leased.id, NOW + 1, "preempted: not_parked", 12.5)
    again = store.release_lease("car-1", leased.id, NOW + 2, "shutdown", 0.5)

    assert (returned, again) == (2, 0)
    got = store.get_lease("car-1", leased.id)
    assert got is not None
    assert (got.state, got.end_reason, got.energy_j) == (
        "released",
        "preempted: not_parked",
        13.0,
    )
    assert store.list_leases(active_only=False)[0].end_reason == "preempted: not_parked"


def test_a_lease_that_ended_otherwise_has_no_end_reason(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, size=1)
    other = must_lease(store, size=1)
    commit(store, leased, [0])
    store.expire_leases(NOW + LEASE_SECONDS + 1)

    store.release_lease("car-1", leased.id, NOW + 50, "shutdown", 1.0)

    finished = store.get_lease("car-1", leased.id)
    expired = store.get_lease("car-1", other.id)
    assert finished is not None and expired is not None
    assert (finished.state, finished.end_reason, finished.energy_j) == ("finished", None, 1.0)
    assert (expired.state, expired.end_reason) == ("expired", None)
    assert store.release_lease("car-2", leased.id, NOW, "x", 4.0) is None
    assert _energy(store, leased) == 1.0


# -- vehicle status reason -----------------------------------------------------------------------


def test_touch_vehicle_keeps_the_reason_until_the_next_heartbeat(store: Store) -> None:
    store.upsert_vehicle(vehicle_record("car-1"))

    store.touch_vehicle("car-1", NOW + 1, "paused", "not_parked, not_charging")
    paused = store.get_vehicle("car-1")
    store.touch_vehicle("car-1", NOW + 2, "working")
    working = store.get_vehicle("car-1")

    assert paused is not None and working is not None
    assert (paused.status, paused.status_reason) == ("paused", "not_parked, not_charging")
    assert (working.status, working.status_reason) == ("working", None)
    assert store.touch_vehicle("car-missing", NOW, "paused", "x") is False


def test_registering_again_replaces_the_status_reason(store: Store) -> None:
    store.upsert_vehicle(vehicle_record("car-1"))
    store.touch_vehicle("car-1", NOW + 1, "paused", "not_charging")

    store.upsert_vehicle(vehicle_record("car-1", now=NOW + 2))

    assert [(v.status, v.status_reason) for v in store.list_vehicles()] == [("idle", None)]


# -- owner policies ------------------------------------------------------------------------------


def test_policy_versions_count_up_from_one_per_vehicle(store: Store) -> None:
    first = store.append_policy("car-1", '{"opted_in": false}', "owner:alice", NOW)
    second = store.append_policy("car-1", '{"opted_in": true}', "owner:alice", NOW + 1)
    other = store.append_policy("car-2", '{"opted_in": true}', "owner:bob", NOW + 2)

    assert first is not None and second is not None and other is not None
    assert [(r.vehicle_id, r.version) for r in (first, second, other)] == [
        ("car-1", 1),
        ("car-1", 2),
        ("car-2", 1),
    ]
    assert store.current_policy("car-1") == second
    assert store.current_policy("car-2") == other
    assert store.current_policy("car-missing") is None
    assert store.policy_history("car-missing") == []


def test_policy_history_is_append_only_and_oldest_first(store: Store) -> None:
    appended = [
        store.append_policy("car-1", f'{{"n": {i}}}', f"owner:{i}", NOW + i) for i in range(5)
    ]

    history = store.policy_history("car-1")
    latest_two = store.policy_history("car-1", limit=2)

    assert history == appended
    assert [(r.version, r.policy_json, r.actor, r.created_at) for r in history] == [
        (i + 1, f'{{"n": {i}}}', f"owner:{i}", NOW + i) for i in range(5)
    ]
    assert latest_two == appended[3:]


def test_append_policy_with_a_stale_expected_version_appends_nothing(store: Store) -> None:
    first = store.append_policy("car-1", "{}", "owner:a", NOW, expect_version=0)
    stale = store.append_policy("car-1", '{"x": 1}', "owner:b", NOW + 1, expect_version=0)
    fresh = store.append_policy("car-1", '{"x": 2}', "owner:c", NOW + 2, expect_version=1)

    assert first is not None and first.version == 1
    assert stale is None
    assert fresh is not None and fresh.version == 2
    assert [r.actor for r in store.policy_history("car-1")] == ["owner:a", "owner:c"]


def test_concurrent_policy_appends_get_distinct_consecutive_versions(store: Store) -> None:
    start = threading.Barrier(8)
    got: list[list[tuple[int, str]]] = [[] for _ in range(8)]

    def owner(i: int) -> None:
        start.wait(timeout=10)
        for n in range(10):
            record = store.append_policy("car-1", f'{{"n": {n}}}', f"owner:{i}", NOW)
            assert record is not None
            got[i].append((record.version, record.actor))

    threads = [threading.Thread(target=owner, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    versions = sorted(v for per_thread in got for v, _ in per_thread)
    assert versions == list(range(1, 81))
    history = store.policy_history("car-1")
    assert [r.version for r in history] == list(range(1, 81))
    assert {(r.version, r.actor) for r in history} == {pair for t in got for pair in t}


def test_policies_survive_close_and_reopen(store_url: str) -> None:
    with opened(store_url) as first:
        appended = first.append_policy("car-1", '{"opted_in": true}', "owner:alice", NOW)

    with opened(store_url) as second:
        assert second.current_policy("car-1") == appended
        again = second.append_policy("car-1", "{}", "owner:alice", NOW + 1)
        assert again is not None and again.version == 2


# -- migration 2 on a database of migration 1 ----------------------------------------------------


def _sqlite_v1_with_rows(url: str) -> None:
    """A database as a coordinator of schema 1 left it: one batch, request, lease, vehicle."""
    import sqlite3

    path = url.removeprefix("sqlite:///")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(
        "CREATE TABLE schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    for statement in MIGRATIONS[0].sql("sqlite").split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO schema_migrations VALUES (1, ?, ?)", (MIGRATIONS[0].name, NOW))
    db.execute(
        "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
        "created_at, expires_at, seq_no) VALUES "
        "('batch-old', 'file-1', '/v1/embeddings', '24h', 'in_progress', ?, ?, 1)",
        (int(NOW), int(NOW) + 86_400),
    )
    for seq in range(3):
        db.execute(
            "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
            "sort_key, state) VALUES ('batch-old', ?, ?, ?, 'float', '[\"x\"]', 1, ?)",
            (seq, f"req-{seq}", MODEL, "leased" if seq == 0 else "pending"),
        )
    db.execute("UPDATE requests SET lease_id = 'lease-old' WHERE seq = 0")
    db.execute(
        "INSERT INTO leases VALUES ('lease-old', 'batch-old', 'car-1', ?, '[0]', ?, ?, 'active')",
        (MODEL, NOW, NOW + LEASE_SECONDS),
    )
    db.execute(
        "INSERT INTO vehicles VALUES ('car-1', '{}', ?, ?, ?, 'working')",
        (f'["{MODEL}"]', NOW, NOW),
    )
    db.close()


def _postgresql_v1_with_rows(url: str) -> None:
    """The same rows as ``_sqlite_v1_with_rows``, in a PostgreSQL schema of migration 1."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        db.execute(MIGRATIONS[0].sql("postgresql"))
        db.execute("INSERT INTO schema_migrations VALUES (1, %s, %s)", (MIGRATIONS[0].name, NOW))
        db.execute(
            "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
            "created_at, expires_at, seq_no) VALUES "
            "('batch-old', 'file-1', '/v1/embeddings', '24h', 'in_progress', %s, %s, 1)",
            (int(NOW), int(NOW) + 86_400),
        )
        for seq in range(3):
            db.execute(
                "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
                "sort_key, state) VALUES ('batch-old', %s, %s, %s, 'float', '[\"x\"]', 1, %s)",
                (seq, f"req-{seq}", MODEL, "leased" if seq == 0 else "pending"),
            )
        db.execute("UPDATE requests SET lease_id = 'lease-old' WHERE seq = 0")
        db.execute(
            "INSERT INTO leases VALUES "
            "('lease-old', 'batch-old', 'car-1', %s, '[0]', %s, %s, 'active')",
            (MODEL, NOW, NOW + LEASE_SECONDS),
        )
        db.execute(
            "INSERT INTO vehicles VALUES ('car-1', '{}', %s, %s, %s, 'working')",
            (f'["{MODEL}"]', NOW, NOW),
        )


# name -> builder of a schema-1 database with rows at a URL that BACKENDS gave.
SCHEMA_1_BUILDERS: dict[str, Callable[[str], None]] = {
    "postgresql": _postgresql_v1_with_rows,
    "sqlite": _sqlite_v1_with_rows,
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_migration_2_upgrades_a_schema_1_database_with_defaults(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = BACKENDS[backend](request)
    SCHEMA_1_BUILDERS[backend](url)

    with opened(url) as upgraded:
        assert _schema_version(upgraded) == LATEST_SCHEMA
        batch = upgraded.get_batch("batch-old")
        old_lease = upgraded.get_lease("car-1", "lease-old")
        car = upgraded.get_vehicle("car-1")
        assert batch is not None and (batch.purpose, batch.data_region) == ("general", "global")
        assert old_lease is not None
        assert (old_lease.purpose, old_lease.data_region) == ("general", "global")
        assert (old_lease.energy_j, old_lease.end_reason) == (0.0, None)
        assert car is not None and (car.status, car.status_reason) == ("working", None)
        assert upgraded.current_policy("car-1") is None
        assert upgraded.request_counts("batch-old") == RequestCounts(total=3, pending=2, leased=1)
        # The old rows work with the new code: a general/global consent leases the rest.
        relet = must_lease(upgraded, "car-2", purposes=["general"], data_regions=["global"])
        assert (relet.batch_id, seqs_of(relet)) == ("batch-old", [1, 2])
        assert upgraded.release_lease("car-1", "lease-old", NOW + 1, "shutdown", 2.0) == 1


# -- migration 6 on a database of migration 5 ----------------------------------------------------

_OLD_VECTORS = struct.pack("<4f", 0.5, -1.0, 2.0, 0.25)
"""The stored float32 rows of the schema-5 database's done request (two vectors of dim 2)."""

_OLD_ERROR = {"error": {"message": "bad line 2", "code": "invalid_request"}}

_SCHEMA_5_ROWS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (
        "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
        "created_at, expires_at, seq_no) VALUES "
        "('batch-old', 'file-1', '/v1/embeddings', '24h', 'in_progress', ?, ?, 1)",
        (int(NOW), int(NOW) + 86_400),
    ),
    (  # done, with its response body pre-rendered as results arrived
        "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
        "sort_key, state, lease_id, vehicle_id, vectors, dim, token_count, body) VALUES "
        "('batch-old', 0, 'req-0', ?, 'base64', ?, 6, 'done', 'lease-old', 'car-1', ?, 2, 7, ?)",
        (MODEL, '["héllo","x"]', _OLD_VECTORS, b'{"object":"list","data":[]}'),
    ),
    (
        "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
        "sort_key, state) VALUES ('batch-old', 1, 'req-1', ?, 'float', ?, 7, 'pending')",
        (MODEL, '["wörld","yz"]'),
    ),
    (  # failed validation: no texts, as schema 5's code stored it
        "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
        "sort_key, state, error_status, error_body) VALUES "
        "('batch-old', 2, 'req-2', '', 'float', '[]', 0, 'failed', 400, ?)",
        (json.dumps(_OLD_ERROR),),
    ),
    (
        "INSERT INTO requests (batch_id, seq, custom_id, model, encoding_format, texts, "
        "sort_key, state) VALUES ('batch-old', 3, 'req-3', ?, 'float', '[\"abcdefgh\"]', 8, "
        "'pending')",
        (MODEL,),
    ),
    (
        "INSERT INTO batch_counts (batch_id, shard, pending, done, failed) "
        "VALUES ('batch-old', 0, 2, 1, 1)",
        (),
    ),
    (
        "INSERT INTO leases (id, batch_id, vehicle_id, model, seqs, created_at, deadline, state) "
        "VALUES ('lease-old', 'batch-old', 'car-1', ?, '[0]', ?, ?, 'finished')",
        (MODEL, NOW, NOW + LEASE_SECONDS),
    ),
    (
        "INSERT INTO vehicles (id, hardware, models, registered_at, last_seen, status, "
        "completed) VALUES ('car-1', '{}', ?, ?, ?, 'idle', 1)",
        (json.dumps([MODEL]), NOW, NOW),
    ),
)
"""A batch as a coordinator of schema 5 left it: one request done, two pending (seq 3 the
longer), one that failed validation."""


Rows = Sequence[tuple[str, tuple[Any, ...]]]
"""INSERT statements (with ``?`` marks) and their arguments."""


def _sqlite_at(url: str, version: int, rows: Rows) -> None:
    """A database of schema ``version`` (the first ``version`` migrations) holding ``rows``."""
    import sqlite3

    db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    db.execute(
        "CREATE TABLE schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    for migration in MIGRATIONS[:version]:
        db.executescript(migration.sql("sqlite"))
        db.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, ?)",
            (migration.version, migration.name, NOW),
        )
    for statement, args in rows:
        db.execute(statement, args)
    db.close()


def _postgresql_at(url: str, version: int, rows: Rows) -> None:
    """The same as ``_sqlite_at``, in a PostgreSQL schema."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        for migration in MIGRATIONS[:version]:
            db.execute(migration.sql("postgresql"))
            db.execute(
                "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                (migration.version, migration.name, NOW),
            )
        for statement, args in rows:
            db.execute(statement.replace("?", "%s"), args)


# name -> builder of a database of an older schema with rows, at a URL that BACKENDS gave.
SCHEMA_BUILDERS: dict[str, Callable[[str, int, Rows], None]] = {
    "postgresql": _postgresql_at,
    "sqlite": _sqlite_at,
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_migration_6_turns_a_schema_5_databases_texts_and_vectors_into_payloads_and_results(
    backend: str, request: pytest.FixtureRequest
) -> None:
    assert MIGRATIONS[4].version == 5  # the builders above are of this schema
    url = BACKENDS[backend](request)
    SCHEMA_BUILDERS[backend](url, 5, _SCHEMA_5_ROWS)

    with opened(url) as upgraded:
        version = _schema_version(upgraded)
        counts = upgraded.request_counts("batch-old")
        payloads = upgraded.request_payloads("batch-old", [0, 1, 2, 3])
        old_lease = upgraded.get_lease("car-1", "lease-old")
        relet = must_lease(upgraded, "car-2")
        finished = commit(upgraded, relet, seqs_of(relet))
        rows = stored(upgraded, "batch-old")
        usage = upgraded.vehicle_usage("batch-old")

    assert version == LATEST_SCHEMA
    assert counts == RequestCounts(total=4, completed=1, failed=1, pending=2)
    assert payloads == {0: ["héllo", "x"], 1: ["wörld", "yz"], 3: ["abcdefgh"]}
    assert old_lease is not None
    assert (old_lease.state, old_lease.endpoint) == ("finished", "/v1/embeddings")
    # The old rows lease in their old order (sort_key 8, then 7) and commit with the new code.
    assert (relet.batch_id, relet.endpoint) == ("batch-old", "/v1/embeddings")
    assert [(i.seq, i.custom_id, i.payload) for i in relet.items] == [
        (3, "req-3", ["abcdefgh"]),
        (1, "req-1", ["wörld", "yz"]),
    ]
    assert (finished.committed, finished.lease_finished) == (2, True)
    assert [rows[s].state for s in range(4)] == ["done", "done", "failed", "done"]
    assert (rows[0].options, rows[0].model, rows[0].result, rows[0].token_count) == (
        "base64",
        MODEL,
        _OLD_VECTORS,
        7,
    )
    assert (rows[1].options, rows[1].result, rows[1].token_count) == (
        "float",
        result(1).result,
        result(1).token_count,
    )
    assert rows[3].result == result(3).result
    assert (rows[2].error_status, rows[2].error_body, rows[2].result) == (400, _OLD_ERROR, None)
    assert usage == {"car-1": 1, "car-2": 2}


# -- migration 7 on a database of migration 6 ----------------------------------------------------

_OLD_RESULT = struct.pack("<2f", 0.5, -1.0)

_SCHEMA_6_ROWS: Rows = (
    (
        "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
        "created_at, expires_at, seq_no) VALUES "
        "('batch-old', 'file-1', '/v1/chat/completions', '24h', 'in_progress', ?, ?, 1)",
        (int(NOW), int(NOW) + 86_400),
    ),
    (
        "INSERT INTO requests (batch_id, seq, custom_id, model, options, payload, sort_key, "
        "state, lease_id) VALUES ('batch-old', 0, 'req-0', ?, '', '[\"a\"]', 3, 'leased', "
        "'lease-old')",
        (MODEL,),
    ),
    (
        "INSERT INTO requests (batch_id, seq, custom_id, model, options, payload, sort_key, "
        "state) VALUES ('batch-old', 1, 'req-1', ?, '', '[\"b\"]', 2, 'pending')",
        (MODEL,),
    ),
    (
        "INSERT INTO requests (batch_id, seq, custom_id, model, options, payload, sort_key, "
        "state, lease_id, vehicle_id, result, token_count) VALUES "
        "('batch-old', 2, 'req-2', ?, '', '[\"c\"]', 1, 'done', 'lease-old', 'car-1', ?, 4)",
        (MODEL, _OLD_RESULT),
    ),
    (
        "INSERT INTO batch_counts (batch_id, shard, pending, leased, done) "
        "VALUES ('batch-old', 0, 1, 1, 1)",
        (),
    ),
    (
        "INSERT INTO leases (id, batch_id, vehicle_id, model, seqs, created_at, deadline, state) "
        "VALUES ('lease-old', 'batch-old', 'car-1', ?, '[0, 2]', ?, ?, 'active')",
        (MODEL, NOW, NOW + LEASE_SECONDS),
    ),
    (
        "INSERT INTO vehicles (id, hardware, models, registered_at, last_seen, status, "
        "completed) VALUES ('car-1', '{}', ?, ?, ?, 'working', 1)",
        (json.dumps([MODEL]), NOW, NOW),
    ),
)
"""A batch as a coordinator of schema 6 left it: car-1's lease holds request 0 and finished
request 2; request 1 is pending."""


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_migration_7_leaves_a_schema_6_databases_requests_without_progress_until_reported(
    backend: str, request: pytest.FixtureRequest
) -> None:
    assert MIGRATIONS[5].version == 6  # the rows above are of this schema
    url = BACKENDS[backend](request)
    SCHEMA_BUILDERS[backend](url, 6, _SCHEMA_6_ROWS)

    with opened(url) as upgraded:
        version = _schema_version(upgraded)
        pending = must_lease(upgraded, "car-2")
        kept = upgraded.record_progress(
            "car-1", "lease-old", [(0, TOKENS), (2, b"done")], NOW + 1, LEASE_SECONDS
        )
        upgraded.release_lease("car-1", "lease-old", NOW + 2, "preempted: not_parked")
        resumed = must_lease(upgraded, "car-3", now=NOW + 3)
        rows = stored(upgraded, "batch-old")

    assert version == LATEST_SCHEMA
    assert [(i.seq, i.payload, i.progress) for i in pending.items] == [(1, ["b"], None)]
    assert (kept.committed, kept.lease_active, kept.deadline) == (1, True, NOW + 1 + LEASE_SECONDS)
    assert [(i.seq, i.payload, i.progress) for i in resumed.items] == [(0, ["a"], TOKENS)]
    assert (rows[2].state, rows[2].result, rows[2].token_count) == ("done", _OLD_RESULT, 4)


# -- batch operations: many leases or commits in one transaction ---------------------------------


def ask(
    vehicle_id: str,
    size: int = 100,
    *,
    lease_id: str | None = None,
    unit_size: Callable[[int], int] | None = None,
    purposes: Iterable[str] = PURPOSES,
) -> LeaseAsk:
    return LeaseAsk(
        vehicle_id,
        lease_id or f"lease-{next(_lease_numbers)}",
        (MODEL,),
        tuple(purposes),
        tuple(DATA_REGIONS),
        unit_size or take(size),
    )


def test_lease_units_serves_the_asks_in_order_as_if_one_after_the_other(store: Store) -> None:
    add_batch(store, n=7)
    seen: list[int] = []

    def two(pending: int) -> int:
        seen.append(pending)
        return 2

    got = store.lease_units(
        [ask("car-1", unit_size=two), ask("car-2", unit_size=two), ask("car-3", 100)],
        NOW,
        LEASE_SECONDS,
    )

    assert all(isinstance(g, Lease) for g in got)
    leases = [g for g in got if isinstance(g, Lease)]
    assert [seqs_of(g) for g in leases] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [g.vehicle_id for g in leases] == ["car-1", "car-2", "car-3"]
    assert seen == [7, 5]
    assert store.request_counts("batch-1") == RequestCounts(total=7, leased=7)
    assert store.active_lease_count("batch-1") == 3


def test_lease_units_answers_none_once_the_work_runs_out(store: Store) -> None:
    add_batch(store, n=3)

    got = store.lease_units([ask("car-1", 2), ask("car-2", 2), ask("car-3", 2)], NOW, 30)

    assert [seqs_of(g) if isinstance(g, Lease) else g for g in got] == [[0, 1], [2], None]


def test_an_ask_that_raises_gets_its_error_and_the_others_their_units(store: Store) -> None:
    add_batch(store, n=4)

    def broken(pending: int) -> int:
        raise RuntimeError("planner bug")

    got = store.lease_units(
        [ask("car-1", 1), ask("car-2", unit_size=broken), ask("car-3", 1)], NOW, 30
    )

    assert isinstance(got[0], Lease) and seqs_of(got[0]) == [0]
    assert isinstance(got[1], RuntimeError) and str(got[1]) == "planner bug"
    assert isinstance(got[2], Lease) and seqs_of(got[2]) == [1]
    assert store.request_counts("batch-1") == RequestCounts(total=4, pending=2, leased=2)
    assert store.active_lease_count("batch-1") == 2


def test_an_ask_the_owner_does_not_allow_does_not_stop_the_next_ones(store: Store) -> None:
    add_tagged_batch(store, "batch-r", "research", "global")

    got = store.lease_units(
        [ask("car-1", purposes=["general"]), ask("car-2", 2, purposes=["research"])], NOW, 30
    )

    assert got[0] is None
    assert isinstance(got[1], Lease) and got[1].batch_id == "batch-r"


def test_commit_many_commits_each_chunk_in_order_and_the_first_result_wins(store: Store) -> None:
    add_batch(store, n=4)
    first = must_lease(store, "car-1", size=2)
    second = must_lease(store, "car-2", size=2)

    outcomes = store.commit_many(
        [
            ResultCommit("car-1", first.id, (result(0, tag=1),), 1.5),
            ResultCommit("car-2", second.id, (result(2, tag=2), result(3, tag=2))),
            ResultCommit("car-1", first.id, (result(0, tag=3), result(1, tag=3))),
            ResultCommit("car-9", first.id, (result(1, tag=4),)),
        ],
        NOW + 1,
        LEASE_SECONDS,
    )

    assert [(o.committed, o.duplicates) for o in outcomes if isinstance(o, CommitOutcome)] == [
        (1, 0),
        (2, 0),
        (1, 1),
        (0, 0),
    ]
    assert isinstance(outcomes[3], CommitOutcome) and outcomes[3].unknown_lease
    assert isinstance(outcomes[1], CommitOutcome) and outcomes[1].lease_finished
    assert isinstance(outcomes[2], CommitOutcome) and outcomes[2].lease_finished
    rows = stored(store)
    assert [rows[s].result for s in range(4)] == [
        result(0, 1).result,
        result(1, 3).result,
        result(2, 2).result,
        result(3, 2).result,
    ]
    held = store.get_lease("car-1", first.id)
    assert held is not None and (held.energy_j, held.state) == (1.5, "finished")


def test_a_chunk_that_raises_changes_nothing_and_the_others_commit(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1", size=2)

    outcomes = store.commit_many(
        [
            ResultCommit("car-1", leased.id, (result(0),), float("nan")),
            ResultCommit("car-1", leased.id, (result(1),), 2.0),
        ],
        NOW,
        LEASE_SECONDS,
    )

    assert isinstance(outcomes[0], ValueError)
    assert isinstance(outcomes[1], CommitOutcome) and outcomes[1].committed == 1
    assert store.request_counts("batch-1") == RequestCounts(
        total=2, completed=1, leased=1, pending=0
    )
    held = store.get_lease("car-1", leased.id)
    assert held is not None and held.energy_j == 2.0


# -- batch claims: singleton duties under concurrency --------------------------------------------


def test_only_one_owner_can_claim_a_batch_until_the_claim_runs_out(store: Store) -> None:
    add_batch(store, n=1, status="validating")

    mine = store.claim_batch("batch-1", ["validating"], "replica-a", NOW, 60)
    theirs = store.claim_batch("batch-1", ["validating"], "replica-b", NOW + 59, 60)
    again = store.claim_batch("batch-1", ["validating"], "replica-a", NOW + 59, 60)
    taken_over = store.claim_batch("batch-1", ["validating"], "replica-b", NOW + 120, 60)

    assert mine is not None and mine.status == "validating"
    assert theirs is None
    assert again is not None
    assert taken_over is not None


def test_a_claim_applies_its_changes_only_when_it_succeeds(store: Store) -> None:
    add_batch(store, n=1)

    won = store.claim_batch(
        "batch-1", ["in_progress"], "a", NOW, 60, status="finalizing", finalizing_at=int(NOW)
    )
    lost = store.claim_batch(
        "batch-1", ["in_progress", "finalizing"], "b", NOW, 60, status="cancelling"
    )
    wrong_status = store.claim_batch("batch-1", ["validating"], "a", NOW, 60, status="failed")

    assert won is not None and (won.status, won.finalizing_at) == ("finalizing", int(NOW))
    assert lost is None and wrong_status is None
    assert store.get_batch("batch-1").status == "finalizing"  # type: ignore[union-attr]


def test_a_claim_refuses_fields_that_are_not_updatable(store: Store) -> None:
    add_batch(store, n=1)

    with pytest.raises(ValueError, match="cannot update"):
        store.claim_batch("batch-1", ["in_progress"], "a", NOW, 60, claim_owner="b")
    with pytest.raises(ValueError, match="cannot update"):
        store.update_batch("batch-1", ["in_progress"], claim_until=0)


def test_concurrent_claims_from_threads_have_exactly_one_winner(store: Store) -> None:
    add_batch(store, n=1)
    start = threading.Barrier(8)
    wins: list[str] = []

    def replica(i: int) -> None:
        start.wait(timeout=10)
        if store.claim_batch("batch-1", ["in_progress"], f"r{i}", NOW, 60, status="finalizing"):
            wins.append(f"r{i}")

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert len(wins) == 1


def _output_file(store: Store, file_id: str, batch_id: str = "batch-1") -> str:
    record = replace(file_record(file_id, size=3), purpose="batch_output", batch_id=batch_id)
    store.put_file(record, [b"out"])
    return file_id


def test_finish_batch_is_only_for_the_claims_holder(store: Store) -> None:
    add_batch(store, n=1)
    store.claim_batch("batch-1", ["in_progress"], "a", NOW, 60, status="finalizing")

    stranger = store.finish_batch("batch-1", ["finalizing"], "b", status="completed")
    holder = store.finish_batch(
        "batch-1", ["finalizing"], "a", status="completed", completed_at=int(NOW)
    )
    twice = store.finish_batch("batch-1", ["finalizing"], "a", status="completed")

    assert stranger is None and twice is None
    assert holder is not None and (holder.status, holder.completed_at) == ("completed", int(NOW))


def test_finish_batch_lets_the_claim_go_when_the_status_moved_on(store: Store) -> None:
    add_batch(store, n=1, status="validating")
    store.claim_batch("batch-1", ["validating"], "a", NOW, 60)
    store.update_batch("batch-1", ["validating"], status="cancelling")  # a cancel came in

    finished = store.finish_batch("batch-1", ["validating"], "a", status="in_progress")
    cancel = store.claim_batch("batch-1", ["cancelling"], "b", NOW + 1, 60)

    assert finished is None
    assert cancel is not None and cancel.status == "cancelling"  # no waiting for a's claim


def test_finish_batch_keeps_exactly_the_output_files_it_names(store: Store) -> None:
    add_batch(store, n=1)
    add_batch(store, "batch-2", n=1, created_at=int(NOW) + 1)
    store.claim_batch("batch-1", ["in_progress"], "a", NOW, 60, status="finalizing")
    orphan = _output_file(store, "file-dead-attempt")  # a replica died after writing this
    other_batch = _output_file(store, "file-of-batch-2", batch_id="batch-2")
    output = _output_file(store, "file-out")
    errors = _output_file(store, "file-err")
    store.put_file(file_record("file-input"), [b"{}"])  # a customer's file: no batch

    done = store.finish_batch(
        "batch-1",
        ["finalizing"],
        "a",
        status="completed",
        output_file_id=output,
        error_file_id=errors,
    )

    assert done is not None
    assert store.get_file(orphan) is None
    assert {f for f in (output, errors, other_batch, "file-input") if store.get_file(f)} == {
        output,
        errors,
        other_batch,
        "file-input",
    }
    assert b"".join(store.read_file(output)) == b"out"


def test_batch_files_are_the_output_and_error_files_of_that_batch(store: Store) -> None:
    _output_file(store, "file-out-b")
    _output_file(store, "file-out-a")
    _output_file(store, "file-of-batch-2", batch_id="batch-2")
    store.put_file(file_record("file-input"), [b"{}"])  # a customer's file: no batch

    files = store.batch_files("batch-1")

    assert [f.id for f in files] == ["file-out-a", "file-out-b"]
    assert files[0] == store.get_file("file-out-a")
    assert store.batch_files("batch-missing") == []


def test_a_files_batch_id_round_trips(store: Store) -> None:
    _output_file(store, "file-out")

    got = store.get_file("file-out")

    assert got is not None and (got.batch_id, got.purpose) == ("batch-1", "batch_output")


# -- liveness in batches -------------------------------------------------------------------------


def test_record_liveness_writes_a_batch_of_heartbeats_newest_wins(store: Store) -> None:
    store.upsert_vehicles([vehicle_record("car-1"), vehicle_record("car-2")])

    changed = store.record_liveness(
        [
            VehicleSeen("car-1", NOW + 10, "working"),
            VehicleSeen("car-2", NOW + 10, "paused", "not_charging"),
            VehicleSeen("car-1", NOW + 5, "idle"),  # an older heartbeat flushed late
            VehicleSeen("car-ghost", NOW + 10, "idle"),  # never registered
        ]
    )

    assert changed == 2
    one, two = store.get_vehicle("car-1"), store.get_vehicle("car-2")
    assert one is not None and (one.last_seen, one.status) == (NOW + 10, "working")
    assert two is not None and (two.status, two.status_reason) == ("paused", "not_charging")
    assert store.get_vehicle("car-ghost") is None


def test_live_vehicles_are_those_seen_since(store: Store) -> None:
    store.upsert_vehicles(
        [
            vehicle_record("car-old", now=NOW - 100),
            vehicle_record("car-new", models=("m1", "m2"), now=NOW),
            vehicle_record("car-edge", now=NOW - 15),
        ]
    )

    live = store.live_vehicles(NOW - 15)

    assert store.count_live_vehicles(NOW - 15) == 2
    assert store.count_live_vehicles(NOW + 1) == 0
    assert [v.id for v in live] == ["car-edge", "car-new"]
    assert live[1] == VehicleLiveness("car-new", ("m1", "m2"), NOW, "idle", None)


def test_vehicle_liveness_finds_the_registered_ones(store: Store) -> None:
    store.upsert_vehicles([vehicle_record(f"car-{i}") for i in range(600)])

    found = store.vehicle_liveness([f"car-{i}" for i in range(0, 1200, 2)])

    assert sorted(found) == sorted(f"car-{i}" for i in range(0, 600, 2))
    assert found["car-2"].models == (MODEL,)


# -- policies read in bulk -----------------------------------------------------------------------


def test_current_policies_are_the_latest_version_of_each(store: Store) -> None:
    store.append_policy("car-1", '{"v": 1}', "owner:a", NOW)
    store.append_policy("car-1", '{"v": 2}', "owner:a", NOW + 1)
    store.append_policy("car-2", '{"v": 1}', "owner:b", NOW + 2)

    current = store.current_policies(["car-1", "car-2", "car-3"])

    assert {vid: (r.version, r.policy_json) for vid, r in current.items()} == {
        "car-1": (2, '{"v": 2}'),
        "car-2": (1, '{"v": 1}'),
    }


def test_policies_since_lists_the_versions_appended_since(store: Store) -> None:
    store.append_policy("car-1", "{}", "owner:a", NOW)
    store.append_policy("car-2", "{}", "owner:b", NOW + 5)
    store.append_policy("car-1", "{}", "owner:a", NOW + 10)

    recent = store.policies_since(NOW + 5)

    assert [(r.vehicle_id, r.version) for r in recent] == [("car-2", 1), ("car-1", 2)]


def test_commit_and_lease_commits_first_then_leases_in_one_call(store: Store) -> None:
    add_batch(store, n=4)
    first = must_lease(store, "car-1", size=2)

    outcomes, leases = store.commit_and_lease(
        [
            ResultCommit("car-1", first.id, (result(0), result(1)), 1.0),
            ResultCommit("car-1", first.id, (result(0),), float("inf")),  # refused alone
        ],
        [ask("car-2", 1), ask("car-3", 5), ask("car-4", 1)],
        NOW + 1,
        LEASE_SECONDS,
    )

    assert isinstance(outcomes[0], CommitOutcome)
    assert (outcomes[0].committed, outcomes[0].lease_finished) == (2, True)
    assert isinstance(outcomes[1], ValueError)
    assert [seqs_of(g) if isinstance(g, Lease) else g for g in leases] == [[2], [3], None]
    assert store.request_counts("batch-1") == RequestCounts(total=4, completed=2, leased=2)
    held = store.get_lease("car-1", first.id)
    assert held is not None and (held.state, held.energy_j) == ("finished", 1.0)


def test_commit_and_lease_with_nothing_to_do_changes_nothing(store: Store) -> None:
    add_batch(store, n=2)

    assert store.commit_and_lease([], [], NOW, LEASE_SECONDS) == ([], [])
    assert store.request_counts("batch-1") == RequestCounts(total=2, pending=2)


# -- a turn's commits at once equal the same commits one by one -----------------------------------

_chunk = st.tuples(
    st.sampled_from(["A", "B", "C", "A-by-car-2", "unknown"]),
    st.one_of(st.just(list(range(10))), st.lists(st.integers(0, 9), max_size=6)),
    st.integers(0, 3),  # tag
    st.sampled_from([0.0, 1.5, -1.0]),  # -1: refused
)


def _history(s: Store) -> dict[str, Lease]:
    """Lease A (car-1) expires and its requests go to lease B (car-2): A's answers are late
    answers for requests B holds. Lease C (car-3) holds others; requests 8-9 stay pending."""
    add_batch(s, n=10)
    a = must_lease(s, "car-1", size=4, now=NOW)
    s.expire_leases(NOW + LEASE_SECONDS + 1)
    b = must_lease(s, "car-2", size=4, now=NOW + LEASE_SECONDS + 2)
    c = must_lease(s, "car-3", size=4, now=NOW + LEASE_SECONDS + 2)
    return {"A": a, "B": b, "C": c}


def _chunks(leases: dict[str, Lease], drawn: list[tuple[Any, ...]]) -> list[ResultCommit]:
    chunks = []
    for which, seqs, tag, energy in drawn:
        if which == "unknown":
            vehicle, lease_id = "car-1", "lease-that-never-was"
        elif which == "A-by-car-2":
            vehicle, lease_id = "car-2", leases["A"].id
        else:
            vehicle, lease_id = leases[which].vehicle_id, leases[which].id
        chunks.append(ResultCommit(vehicle, lease_id, tuple(result(q, tag) for q in seqs), energy))
    return chunks


def _state(s: Store, leases: dict[str, Lease]) -> tuple[Any, ...]:
    held = {k: s.get_lease(v.vehicle_id, v.id) for k, v in leases.items()}
    return (
        [(r.seq, r.state, r.result) for r in s.iter_requests("batch-1")],
        {k: (h.state, h.energy_j, h.deadline) for k, h in held.items() if h is not None},
        s.request_counts("batch-1"),
        s.active_lease_count("batch-1"),
        {v.id: v.completed_requests for v in s.list_vehicles()},
    )


def _outcome(o: CommitOutcome | Exception) -> Any:
    return type(o).__name__ if isinstance(o, Exception) else o


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@settings(max_examples=60, deadline=None, database=None)
@given(drawn=st.lists(_chunk, max_size=8))
@example(drawn=[("A", list(range(10)), 1, 0.0), ("B", [0], 2, 1.5)])  # A's late answer closes B
def test_commit_many_equals_committing_the_same_chunks_one_by_one(
    backend: str, drawn: list[tuple[Any, ...]], request: pytest.FixtureRequest
) -> None:
    now = NOW + LEASE_SECONDS + 3
    with (
        opened(BACKENDS[backend](request)) as together,
        opened(BACKENDS[backend](request)) as one_by_one,
    ):
        for s in (together, one_by_one):
            s.upsert_vehicles([vehicle_record(f"car-{i}") for i in (1, 2, 3)])
        leases = _history(together)
        others = _history(one_by_one)
        assert [le.items for le in leases.values()] == [le.items for le in others.values()]

        at_once = together.commit_many(_chunks(leases, drawn), now, LEASE_SECONDS)
        each = [
            one_by_one.commit_many([chunk], now, LEASE_SECONDS)[0]
            for chunk in _chunks(others, drawn)
        ]

        assert [_outcome(o) for o in at_once] == [_outcome(o) for o in each]
        assert _state(together, leases) == _state(one_by_one, others)


# -- a request that fails on every car ends ------------------------------------------------------


@pytest.mark.parametrize("how", ["expire", "return", "release-error"])
def test_a_request_that_fails_on_every_attempt_ends_failed_after_max_attempts(
    store: Store, how: str
) -> None:
    add_batch(store, n=1)
    now = NOW
    outcomes = []
    for attempt in range(store.max_attempts + 1):
        leased = lease(store, f"car-{attempt}", size=1, now=now)
        if leased is None:
            outcomes.append("nothing to lease")
            break
        if how == "expire":
            now += LEASE_SECONDS + 1
            outcomes.append(store.expire_leases(now))
        elif how == "return":
            outcomes.append(store.return_requests(leased.vehicle_id, leased.id, [0]))
        else:
            outcomes.append(store.release_lease(leased.vehicle_id, leased.id, now, "error: OOM"))
        now += 1

    # Back in the queue twice, then failed for good: a third car never gets it again.
    assert outcomes == [1] * (store.max_attempts - 1) + [0, "nothing to lease"]
    (row,) = stored(store).values()
    assert row.state == "failed" and row.error_status == 500
    assert row.error_body is not None and row.error_body["error"]["code"] == "request_failed"
    counts = store.request_counts("batch-1")
    assert (counts.failed, counts.pending, counts.leased) == (1, 0, 0)


@pytest.mark.parametrize("reason", ["preempted: not_parked", "policy: opted out", "shutdown", ""])
def test_a_car_leaving_is_not_a_failed_attempt(store: Store, reason: str) -> None:
    add_batch(store, n=1)
    for attempt in range(store.max_attempts + 2):
        leased = must_lease(store, f"car-{attempt}", size=1, now=NOW + attempt)
        assert store.release_lease(leased.vehicle_id, leased.id, NOW + attempt, reason) == 1

    (row,) = stored(store).values()
    assert row.state == "pending"


CHAT_PAYLOAD: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Grüß dich"}],
    "max_tokens": 5,
    "stop": None,
}
"""A payload of another workload: the store keeps any JSON value as it is."""


def test_request_payloads_are_each_requests_payload_as_given(store: Store) -> None:
    store.create_batch(batch_record())
    store.add_requests(
        "batch-1",
        [
            embedding_request(0, "one", ["a"]),
            embedding_request(1, "three", ["a", "b", "ü"]),
            invalid_request(2),
            NewRequest(seq=3, custom_id="chat", model=MODEL, payload=CHAT_PAYLOAD, sort_key=9),
        ],
    )

    assert store.request_payloads("batch-1", [0, 1, 2, 3, 9]) == {
        0: ["a"],
        1: ["a", "b", "ü"],
        3: CHAT_PAYLOAD,
    }
    assert store.request_payloads("batch-1", []) == {}


def test_a_leased_item_carries_its_payload_as_given(store: Store) -> None:
    store.create_batch(batch_record())
    store.add_requests(
        "batch-1",
        [NewRequest(seq=0, custom_id="chat", model=MODEL, payload=CHAT_PAYLOAD, sort_key=9)],
    )

    leased = must_lease(store)

    assert [(i.seq, i.custom_id, i.payload) for i in leased.items] == [(0, "chat", CHAT_PAYLOAD)]


def test_a_unit_is_cut_at_its_byte_bound_and_its_first_request_always_goes(store: Store) -> None:
    store.create_batch(batch_record())
    big, small = "x" * 3000, "y" * 100
    store.add_requests(
        "batch-1",
        [embedding_request(i, f"r{i}", [big]) for i in range(4)]
        + [embedding_request(4 + i, f"s{i}", [small]) for i in range(4)],
    )

    def ask_for(lease_id: str, max_bytes: int) -> LeaseAsk:
        return LeaseAsk("car-1", lease_id, (MODEL,), PURPOSES, DATA_REGIONS, take(8), max_bytes)

    first, second, third = store.lease_units(
        [ask_for("l1", 1000), ask_for("l2", 7000), ask_for("l3", 10**6)], NOW, LEASE_SECONDS
    )

    # Longest first: one big request alone (over the bound, but a unit never goes empty),
    # then two big ones (6,000 bytes and a bit of JSON), then everything that is left.
    assert isinstance(first, Lease) and len(first.items) == 1
    assert isinstance(second, Lease) and len(second.items) == 2
    assert isinstance(third, Lease) and len(third.items) == 5
    assert store.request_counts("batch-1").pending == 0


# -- progress: a request resumes where its last car left off -------------------------------------

TOKENS = struct.pack("<4I", 17, 0, 0xFFFF_FFFF, 42)
"""A progress record as a workload might encode it: zero bytes, not UTF-8."""


def record(
    store: Store,
    leased: Lease,
    progress: dict[int, bytes],
    *,
    now: float = NOW,
    vehicle_id: str | None = None,
) -> CommitOutcome:
    return store.record_progress(
        vehicle_id or leased.vehicle_id, leased.id, list(progress.items()), now, LEASE_SECONDS
    )


def progress_of(leased: Lease) -> dict[int, bytes | None]:
    return {item.seq: item.progress for item in leased.items}


def test_a_fresh_request_leases_without_progress(store: Store) -> None:
    add_batch(store, n=3)

    leased = must_lease(store)

    assert progress_of(leased) == {0: None, 1: None, 2: None}


@pytest.mark.parametrize("ending", ["released", "expired", "returned"])
def test_progress_travels_with_the_request_to_its_next_lease(store: Store, ending: str) -> None:
    add_batch(store, n=3)
    first = must_lease(store, "car-1")

    outcome = record(store, first, {0: b"\x00zero", 2: TOKENS}, now=NOW + 5)
    if ending == "released":
        store.release_lease("car-1", first.id, NOW + 6, "preempted: not_parked")
    elif ending == "expired":
        store.expire_leases(NOW + 5 + LEASE_SECONDS + 1)
    else:
        store.return_requests("car-1", first.id, [0, 1, 2])
    relet = must_lease(store, "car-2", now=NOW + 100)

    assert (outcome.committed, outcome.duplicates, outcome.unknown_lease) == (2, 0, False)
    assert progress_of(relet) == {0: b"\x00zero", 1: None, 2: TOKENS}


def test_newer_progress_replaces_the_older_also_from_the_next_car(store: Store) -> None:
    add_batch(store, n=2)
    first = must_lease(store, "car-1")
    record(store, first, {0: b"one", 1: b"one"})

    # Two records of one request in one call: the last one is kept, and counted once.
    again = store.record_progress(
        "car-1", first.id, [(0, b"two"), (0, b"three")], NOW + 1, LEASE_SECONDS
    )
    store.release_lease("car-1", first.id, NOW + 2)
    second = must_lease(store, "car-2", now=NOW + 3)
    record(store, second, {1: b"four"}, now=NOW + 4)
    store.release_lease("car-2", second.id, NOW + 5)
    third = must_lease(store, "car-3", now=NOW + 6)

    assert again.committed == 1
    assert progress_of(second) == {0: b"three", 1: b"one"}
    assert progress_of(third) == {0: b"three", 1: b"four"}


def test_progress_for_requests_the_lease_does_not_hold_is_ignored(store: Store) -> None:
    add_batch(store, n=6)
    mine = must_lease(store, "car-1", size=3)
    theirs = must_lease(store, "car-2", size=2)
    commit(store, mine, [1])
    store.return_requests("car-1", mine.id, [2])

    outcome = record(
        store,
        mine,
        {0: b"mine", 1: b"done", 2: b"returned", 3: b"theirs", 5: b"pending", 99: b"unknown"},
    )

    assert (seqs_of(mine), seqs_of(theirs)) == ([0, 1, 2], [3, 4])
    assert (outcome.committed, outcome.duplicates, outcome.lease_active) == (1, 0, True)
    store.release_lease("car-1", mine.id, NOW + 1)
    store.release_lease("car-2", theirs.id, NOW + 1)
    assert progress_of(must_lease(store, "car-3", now=NOW + 2)) == {
        0: b"mine",
        2: None,
        3: None,
        4: None,
        5: None,
    }


def test_progress_on_a_lease_that_is_not_the_vehicles_is_refused(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store, "car-1")

    stranger = record(store, leased, {0: b"x"}, now=NOW + 20, vehicle_id="car-2")
    unknown = store.record_progress("car-1", "lease-missing", [(0, b"x")], NOW + 20, LEASE_SECONDS)

    assert stranger == unknown == CommitOutcome(0, 0, False, None, unknown_lease=True)
    got = store.get_lease("car-1", leased.id)
    assert got is not None and got.deadline == leased.deadline
    store.release_lease("car-1", leased.id, NOW + 21)
    assert progress_of(must_lease(store, "car-3", now=NOW + 22)) == {0: None, 1: None}


def test_recording_progress_extends_an_active_lease(store: Store) -> None:
    add_batch(store, n=2)
    leased = must_lease(store)

    outcome = record(store, leased, {0: b"x"}, now=NOW + 20)
    nothing_new = record(store, leased, {}, now=NOW + 25)

    assert (outcome.lease_active, outcome.deadline) == (True, NOW + 20 + LEASE_SECONDS)
    assert outcome.lease_finished is False
    assert (nothing_new.committed, nothing_new.deadline) == (0, NOW + 25 + LEASE_SECONDS)
    got = store.get_lease("car-1", leased.id)
    assert got is not None and (got.state, got.deadline) == ("active", NOW + 25 + LEASE_SECONDS)
    assert store.expire_leases(NOW + LEASE_SECONDS + 5) == 0
    assert store.expire_leases(NOW + 25 + LEASE_SECONDS + 1) == 2


@pytest.mark.parametrize("ending", ["released", "expired"])
def test_progress_on_a_lease_that_ended_writes_nothing(store: Store, ending: str) -> None:
    add_batch(store, n=2)
    old = must_lease(store, "car-1")
    record(store, old, {0: b"before"})
    if ending == "released":
        store.release_lease("car-1", old.id, NOW + 1)
    else:
        store.expire_leases(old.deadline + 1)
    relet = must_lease(store, "car-2", now=NOW + 50)

    # The old car, late: its requests are the new lease's now.
    late = record(store, old, {0: b"late", 1: b"late"}, now=NOW + 51)

    assert late == CommitOutcome(0, 0, False, None)
    got = store.get_lease("car-2", relet.id)
    assert got is not None and got.deadline == relet.deadline
    store.release_lease("car-2", relet.id, NOW + 52)
    assert progress_of(must_lease(store, "car-3", now=NOW + 53)) == {0: b"before", 1: None}


def test_progress_on_a_finished_lease_writes_nothing(store: Store) -> None:
    add_batch(store, n=1)
    leased = must_lease(store)
    commit(store, leased, [0])

    outcome = record(store, leased, {0: b"late"}, now=NOW + 1)

    assert outcome == CommitOutcome(0, 0, False, None)
    got = store.get_lease("car-1", leased.id)
    assert got is not None and (got.state, got.deadline) == ("finished", leased.deadline)


@pytest.mark.parametrize(
    "progress",
    [
        b"",
        b"\x00",
        bytes(range(256)),
        b"\xff\xfe\x80 not UTF-8 \x00 inside",
        random.Random(5).randbytes(256 * 1024),
    ],
    ids=["empty", "zero-byte", "every-byte", "not-utf8", "256KiB"],
)
def test_progress_bytes_round_trip_exactly(store: Store, progress: bytes) -> None:
    add_batch(store, n=1)
    leased = must_lease(store)
    record(store, leased, {0: progress})
    store.release_lease("car-1", leased.id, NOW + 1)

    (item,) = must_lease(store, "car-2", now=NOW + 2).items

    assert type(item.progress) is bytes and item.progress == progress


def test_progress_survives_close_and_reopen(store_url: str) -> None:
    with opened(store_url) as first:
        add_batch(first, n=2)
        leased = must_lease(first, "car-1")
        record(first, leased, {1: TOKENS})

    with opened(store_url) as second:
        second.release_lease("car-1", leased.id, NOW + 1)
        resumed = must_lease(second, "car-2", now=NOW + 2)

    assert progress_of(resumed) == {0: None, 1: TOKENS}


# -- who may do what: API keys, car enrolments, the principal of files and batches ---------------


def api_key(key_id: str = "key_1", digest: str = "a" * 64, **fields: Any) -> ApiKeyRecord:
    record = ApiKeyRecord(
        id=key_id,
        secret_sha256=digest,
        role="customer",
        principal="acme",
        name="acme's script",
        created_at=NOW,
    )
    return replace(record, **fields)


def new_nkey() -> str:
    return public_nkey(new_nkey_seed())


def enrolment(vehicle_id: str = "car-1", owner: str = "alice", at: float = NOW) -> Enrolment:
    return Enrolment(vehicle_id=vehicle_id, nkey=new_nkey(), owner=owner, enrolled_at=at)


def test_an_api_key_is_found_by_the_hash_of_its_secret_with_its_quotas(store: Store) -> None:
    limited = api_key(
        "key_1", "1" * 64, requests_per_minute=60, tokens_per_minute=10_000, queued_requests=5
    )
    unlimited = api_key("key_2", "2" * 64, role="operator", principal="ops")
    store.put_api_key(limited)
    store.put_api_key(unlimited)

    assert store.api_key_by_hash("1" * 64) == limited
    assert store.api_key_by_hash("2" * 64) == unlimited
    assert store.api_key_by_hash("f" * 64) is None


def test_put_api_key_refuses_a_taken_id_or_secret_hash(store: Store) -> None:
    first = api_key("key_1", "1" * 64)
    store.put_api_key(first)

    with pytest.raises(ValueError):
        store.put_api_key(api_key("key_1", "2" * 64, principal="globex"))
    with pytest.raises(ValueError):
        store.put_api_key(api_key("key_2", "1" * 64, principal="globex"))

    assert store.list_api_keys() == [first]
    assert store.api_key_by_hash("2" * 64) is None


def test_list_api_keys_is_oldest_first(store: Store) -> None:
    keys = [
        api_key("key_c", "3" * 64, created_at=NOW + 1),
        api_key("key_b", "2" * 64, created_at=NOW),
        api_key("key_a", "1" * 64, created_at=NOW + 1),
    ]
    for record in keys:
        store.put_api_key(record)

    assert [k.id for k in store.list_api_keys()] == ["key_b", "key_a", "key_c"]


def test_a_revoked_key_is_still_found_with_the_time_of_its_first_revocation(
    store: Store,
) -> None:
    store.put_api_key(api_key("key_1", "1" * 64))
    store.put_api_key(api_key("key_2", "2" * 64))

    revoked = store.revoke_api_key("key_1", NOW + 5)
    again = store.revoke_api_key("key_1", NOW + 9)
    unknown = store.revoke_api_key("key_missing", NOW + 5)

    assert (revoked, again, unknown) == (True, False, False)
    found = store.api_key_by_hash("1" * 64)
    assert found is not None and found.revoked_at == NOW + 5
    assert store.api_key_by_hash("2" * 64) == api_key("key_2", "2" * 64)  # untouched


def test_enrol_then_get_the_enrolment(store: Store) -> None:
    car = enrolment("car-1", "alice")

    store.enrol(car)

    assert store.get_enrolment("car-1") == car
    assert store.get_enrolment("car-missing") is None


def test_a_car_that_is_enrolled_cannot_be_enrolled_again(store: Store) -> None:
    car = enrolment("car-1", "alice")
    store.enrol(car)

    with pytest.raises(ValueError):
        store.enrol(enrolment("car-1", "bob", at=NOW + 1))

    assert store.get_enrolment("car-1") == car


def test_another_cars_nkey_is_refused_even_once_that_car_is_revoked(store: Store) -> None:
    first = enrolment("car-1")
    store.enrol(first)

    with pytest.raises(ValueError):
        store.enrol(replace(enrolment("car-2"), nkey=first.nkey))
    store.revoke_enrolment("car-1", NOW + 1)
    with pytest.raises(ValueError):
        store.enrol(replace(enrolment("car-2", at=NOW + 2), nkey=first.nkey))

    assert store.get_enrolment("car-2") is None


def test_concurrent_enrolments_of_one_car_or_one_nkey_enrol_one_and_refuse_the_rest(
    store: Store,
) -> None:
    """Two replicas enrolling the same car (or giving two cars the same nkey) at once: on
    PostgreSQL both look-ups miss and the later insert breaks the unique key, which must be
    the same clear refusal (ValueError, a 409 at the API) as a sequential repeat, not a 500."""
    rounds = 12
    outcomes: list[str] = []
    lock = threading.Lock()

    def race(attempts: list[Enrolment]) -> None:
        start = threading.Barrier(len(attempts))

        def attempt(e: Enrolment) -> None:
            start.wait(timeout=10)
            try:
                store.enrol(e)
                outcome = "enrolled"
            except ValueError:
                outcome = "refused"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=attempt, args=(e,)) for e in attempts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    for i in range(rounds):
        race([enrolment(f"same-car-{i}", owner) for owner in ("alice", "bob", "carol")])
        shared = new_nkey()
        race([replace(enrolment(f"key-car-{i}-{j}"), nkey=shared) for j in range(3)])

    assert Counter(outcomes) == Counter(enrolled=2 * rounds, refused=4 * rounds)
    nkeys = [e.nkey for e in store.enrolments()]
    assert len(nkeys) == len(set(nkeys)) == 2 * rounds


def test_a_revoked_car_is_enrolled_again_only_with_a_new_nkey(store: Store) -> None:
    old = enrolment("car-1", "alice")
    store.enrol(old)

    revoked = store.revoke_enrolment("car-1", NOW + 1)
    again = store.revoke_enrolment("car-1", NOW + 2)
    unknown = store.revoke_enrolment("car-missing", NOW + 1)
    cut_off = store.get_enrolment("car-1")
    with pytest.raises(ValueError):
        store.enrol(replace(old, enrolled_at=NOW + 3))  # its revoked key: never reinstated
    new = enrolment("car-1", "bob", at=NOW + 4)
    store.enrol(new)

    assert (revoked, again, unknown) == (True, False, False)
    assert cut_off == replace(old, revoked_at=NOW + 1)
    assert store.get_enrolment("car-1") == new
    assert store.enrolments("alice") == []
    assert store.enrolments("bob") == [new]


def test_enrolments_are_by_vehicle_id_revoked_ones_too_of_one_owner_if_asked(
    store: Store,
) -> None:
    cars = {
        vehicle_id: enrolment(vehicle_id, owner)
        for vehicle_id, owner in (("car-3", "alice"), ("car-1", "bob"), ("car-2", "alice"))
    }
    for car in cars.values():
        store.enrol(car)
    store.revoke_enrolment("car-3", NOW + 1)

    assert [e.vehicle_id for e in store.enrolments()] == ["car-1", "car-2", "car-3"]
    assert store.enrolments("alice") == [cars["car-2"], replace(cars["car-3"], revoked_at=NOW + 1)]
    assert store.enrolments("bob") == [cars["car-1"]]
    assert store.enrolments("carol") == []


def test_the_enrolment_revision_changes_on_every_enrol_and_revoke_only(store: Store) -> None:
    revisions = [store.enrolment_revision()]
    store.enrol(enrolment("car-1", at=NOW))
    revisions.append(store.enrolment_revision())
    store.enrol(enrolment("car-2", at=NOW + 1))
    revisions.append(store.enrolment_revision())
    store.revoke_enrolment("car-1", NOW + 2)
    revisions.append(store.enrolment_revision())
    store.enrol(enrolment("car-1", at=NOW + 3))  # again, with a new key
    revisions.append(store.enrolment_revision())

    # What changes nothing leaves the revision as it is.
    assert not store.revoke_enrolment("car-2-missing", NOW + 4)
    with pytest.raises(ValueError):
        store.enrol(enrolment("car-2", at=NOW + 5))
    store.enrolments()
    unchanged = store.enrolment_revision()

    assert len(set(revisions)) == len(revisions) == 5
    assert unchanged == revisions[-1]


def test_the_enrolment_revision_changes_even_when_the_clock_did_not_move(store: Store) -> None:
    store.enrol(enrolment("car-1", at=NOW))
    store.enrol(enrolment("car-2", at=NOW + 10))  # by a replica whose clock is ahead
    before = store.enrolment_revision()

    store.revoke_enrolment("car-1", NOW + 5)

    assert store.enrolment_revision() != before


def test_a_files_and_a_batchs_principal_round_trip(store: Store) -> None:
    theirs = replace(file_record("file-acme"), principal="acme")
    store.put_file(theirs, [b"{}"])
    store.create_batch(batch_record("batch-acme", principal="acme"))
    store.create_batch(batch_record("batch-before-keys"))

    assert store.get_file("file-acme") == theirs
    acme = store.get_batch("batch-acme")
    legacy = store.get_batch("batch-before-keys")
    assert acme is not None and acme.principal == "acme"
    assert legacy is not None and legacy.principal is None


def test_list_batches_of_a_principal_pages_through_only_theirs(store: Store) -> None:
    owners = ["acme", "globex", "acme", None, "acme", "globex", "acme", "acme"]
    for i, principal in enumerate(owners):
        store.create_batch(batch_record(f"batch-{i}", created_at=int(NOW) + i, principal=principal))

    pages: list[list[str]] = []
    after: str | None = None
    while page := store.list_batches(limit=2, after=after, principal="acme"):
        pages.append([b.id for b in page])
        after = page[-1].id

    acmes = [f"batch-{i}" for i in reversed(range(len(owners))) if owners[i] == "acme"]
    assert pages == [acmes[0:2], acmes[2:4], acmes[4:]]
    assert [b.id for b in store.list_batches(10, principal="globex")] == ["batch-5", "batch-1"]
    assert [b.id for b in store.list_batches(10, after="batch-5", principal="globex")] == [
        "batch-1"
    ]
    assert store.list_batches(10, principal="nobody") == []
    assert len(store.list_batches(10)) == len(owners)  # no principal: every batch


def test_queued_requests_are_the_pending_and_leased_of_a_principals_unfinished_batches(
    store: Store,
) -> None:
    # acme's oldest batch is the one leased from: 6 requests, 2 leased, 1 of them done.
    store.create_batch(batch_record("acme-running", "in_progress", int(NOW), principal="acme"))
    store.add_requests("acme-running", [new_request(seq) for seq in range(6)])
    leased = must_lease(store, size=2)
    commit(store, leased, seqs_of(leased)[:1])
    # One still validating with 2 stored, one with an invalid line (failed, not queued).
    store.create_batch(
        batch_record("acme-validating", "validating", int(NOW) + 1, principal="acme")
    )
    store.add_requests("acme-validating", [new_request(0), new_request(1), invalid_request(2)])
    # Finalizing is unfinished too (an expiring batch is finalizing until its requests are
    # abandoned); the rest do not count: ended or cancelling, another's, made before keys.
    for i, (batch_id, status, principal) in enumerate(
        [
            ("acme-finalizing", "finalizing", "acme"),
            ("acme-cancelling", "cancelling", "acme"),
            ("acme-completed", "completed", "acme"),
            ("globex-running", "in_progress", "globex"),
            ("nobodys-running", "in_progress", None),
        ]
    ):
        store.create_batch(batch_record(batch_id, status, int(NOW) + 2 + i, principal=principal))
        store.add_requests(batch_id, [new_request(seq) for seq in range(3)])

    assert leased.batch_id == "acme-running"
    assert store.queued_requests("acme") == 5 + 2 + 3  # running, validating, finalizing
    assert store.queued_requests("globex") == 3
    assert store.queued_requests("nobody") == 0


def test_keys_and_enrolments_survive_close_and_reopen(store_url: str) -> None:
    key, car = api_key(), enrolment()
    with opened(store_url) as first:
        first.put_api_key(key)
        first.enrol(car)
        first.revoke_api_key(key.id, NOW + 1)

    with opened(store_url) as second:
        assert second.api_key_by_hash(key.secret_sha256) == replace(key, revoked_at=NOW + 1)
        assert second.get_enrolment(car.vehicle_id) == car


def test_a_validating_batch_queues_the_lines_counted_at_creation(store: Store) -> None:
    # Its requests are still being stored: the count taken from its input file holds until
    # validation ends, so two batches made at once cannot both slip under a quota.
    counted = replace(
        batch_record("acme-big", "validating", int(NOW), principal="acme"), expected_requests=7
    )
    store.create_batch(counted)
    store.add_requests("acme-big", [new_request(0), new_request(1)])

    assert store.queued_requests("acme") == 7
    assert store.get_batch("acme-big") == replace(
        counted, request_counts=store.request_counts("acme-big")
    )


# -- verification ----------------------------------------------------------------------------------
def test_trust_rows_round_trip_and_the_last_write_wins(store: Store) -> None:
    assert store.get_trust(["car-1"]) == {}
    store.put_trust([CarTrust("car-1", streak=3, agreed=3, verified_through=5.0)], NOW)
    store.put_trust([CarTrust("car-2", streak=1, agreed=1)], NOW)
    store.record_verification(
        [CarTrust("car-1", streak=0, agreed=3, disagreed=1, quarantined_at=NOW, reason="r")],
        [],
        NOW + 1,
    )
    found = store.get_trust(["car-1", "car-2", "car-3"])
    assert set(found) == {"car-1", "car-2"}
    assert found["car-1"] == CarTrust(
        "car-1",
        streak=0,
        agreed=3,
        disagreed=1,
        verified_through=0.0,
        quarantined_at=NOW,
        reason="r",
    )
    assert [t.vehicle_id for t in store.list_trust()] == ["car-1", "car-2"]
    assert [t.vehicle_id for t in store.list_trust(quarantined_only=True)] == ["car-1"]


def test_redo_returns_a_cars_results_in_running_batches_only(store: Store) -> None:
    add_batch(store, "batch-1", n=4)
    add_batch(store, "batch-2", n=2)
    first = must_lease(store, "car-1", 4)
    commit(store, first, seqs_of(first))
    other = must_lease(store, "car-2", 2)
    commit(store, other, seqs_of(other))
    store.update_batch("batch-2", ["in_progress"], status="completed")
    # car-1 did batch-1 and car-2 batch-2 (finished): only car-1's are redone.
    assert store.redo_results("car-2") == 0
    assert store.redo_results("car-1") == 4
    assert store.request_counts("batch-1").pending == 4
    assert store.request_counts("batch-1").completed == 0
    assert all(r.result is None for r in stored(store, "batch-1").values())
    again = must_lease(store, "car-3", 4)
    assert sorted(seqs_of(again)) == [0, 1, 2, 3]


def test_a_strict_batch_knows_which_results_lack_an_agreeing_verdict(store: Store) -> None:
    add_batch(store, n=3)
    leased = must_lease(store, "car-1", 3)
    commit(store, leased, seqs_of(leased))
    assert [r.seq for r in store.unverified_requests("batch-1")] == [0, 1, 2]
    done = store.done_requests("batch-1", [0, 2, 7])
    assert sorted(done) == [0, 2] and done[0].vehicle_id == "car-1"
    assert done[0].payload == ["text 0", "more ü 0"] and done[0].result == result(0).result
    store.record_verification(
        [],
        [
            VerdictRow("batch-1", 0, "car-1", "agree", "car-2", NOW),
            VerdictRow("batch-1", 1, "car-1", "disagree", "car-2", NOW),
            VerdictRow("batch-1", 2, "car-9", "agree", "car-2", NOW),  # another car's result
        ],
        NOW,
    )
    # The first verdict on a result stands.
    store.record_verdicts([VerdictRow("batch-1", 1, "car-1", "agree", "car-3", NOW)])
    assert [r.seq for r in store.unverified_requests("batch-1")] == [1, 2]
    assert [r.seq for r in store.unverified_requests("batch-1", limit=1)] == [1]


def test_a_quarantined_verifiers_agreements_in_running_batches_are_withdrawn(
    store: Store,
) -> None:
    add_batch(store, "batch-1", n=3)
    add_batch(store, "batch-2", n=1)
    leased = must_lease(store, "car-1", 4)
    commit(store, leased, seqs_of(leased))
    store.record_verdicts(
        [
            VerdictRow("batch-1", 0, "car-1", "agree", "liar", NOW),
            VerdictRow("batch-1", 1, "car-1", "agree", "car-3", NOW),
            VerdictRow("batch-1", 2, "car-1", "disagree", "liar", NOW),
            VerdictRow("batch-2", 0, "car-1", "agree", "liar", NOW),
        ]
    )
    store.update_batch("batch-2", ["in_progress"], status="completed")
    assert store.withdraw_verdicts("car-3") == 1
    store.record_verdicts([VerdictRow("batch-1", 1, "car-1", "agree", "car-3", NOW)])
    # Only its agreements, only in running batches: batch-2 is finalised and keeps its own.
    assert store.withdraw_verdicts("liar") == 1
    assert store.withdraw_verdicts("liar") == 0
    assert [r.seq for r in store.unverified_requests("batch-1")] == [0, 2]
    assert store.unverified_requests("batch-2") == []
    assert store.list_verdicts("batch-1") == [
        VerdictRow("batch-1", 1, "car-1", "agree", "car-3", NOW),
        VerdictRow("batch-1", 2, "car-1", "disagree", "liar", NOW),
    ]
    assert [v.verifier_id for v in store.list_verdicts("batch-2")] == ["liar"]


# -- retention ----------------------------------------------------------------------------------
def test_a_finished_batch_forgets_its_request_rows_after_the_retention_only(store: Store) -> None:
    for batch_id in ("old-done", "new-done", "old-running", "old-failed"):
        add_batch(store, batch_id, n=4)
    leased = must_lease(store, "car-1", 12)
    commit(store, leased, seqs_of(leased))
    store.record_verdicts([VerdictRow("old-done", 0, "car-1", "agree", "car-2", NOW)])
    end = int(NOW) + 10
    store.update_batch("old-done", ["in_progress"], status="completed", completed_at=end)
    store.update_batch("new-done", ["in_progress"], status="completed", completed_at=end + 100)
    store.update_batch("old-failed", ["in_progress"], status="failed", failed_at=end)
    counts_before = store.request_counts("old-done")

    pruned = store.prune_finished_requests(end + 50, end + 60)
    again = store.prune_finished_requests(end + 50, end + 70)

    assert pruned == (2, 8) and again == (0, 0)
    assert list(store.iter_requests("old-done")) == []
    assert list(store.iter_requests("old-failed")) == []
    assert store.done_requests("old-done", [0, 1]) == {}
    # What a customer or the operator reads of the batch is unchanged.
    batch = store.get_batch("old-done")
    assert batch is not None and batch.status == "completed"
    assert store.request_counts("old-done") == counts_before
    # Not finished, or finished too recently: untouched.
    assert len(list(store.iter_requests("new-done"))) == 4
    assert len(list(store.iter_requests("old-running"))) == 4
    assert store.prune_finished_requests(end + 101, end + 110) == (1, 4)


def test_pruning_takes_at_most_the_asked_number_of_batches_oldest_first(store: Store) -> None:
    for i in range(3):
        add_batch(store, f"b{i}", n=2, status="completed")
        store.update_batch(f"b{i}", ["completed"], completed_at=int(NOW) + i)

    first = store.prune_finished_requests(NOW + 100, NOW + 100, max_batches=2)

    assert first == (2, 4)
    assert [len(list(store.iter_requests(f"b{i}"))) for i in range(3)] == [0, 0, 2]


# -- ledger --------------------------------------------------------------------------------------
LEDGER_PRICES = Prices(models={"m": ModelPrice(7, 13, 3)}, owner_share_bp=7000)
_CARS = {"car-1": "alice", "car-2": "alice", "car-3": "bob"}
_ledger_op = st.one_of(
    st.tuples(
        st.just("charge"),
        st.integers(0, 5),  # which piece of work (its key): the same one twice is a duplicate
        st.sampled_from(sorted(_CARS)),
        st.integers(0, 10),  # work_at
        st.integers(0, 5000),  # tokens
    ),
    st.tuples(st.just("replay"), st.integers(0, 50)),
    st.tuples(st.just("verify"), st.sampled_from(sorted(_CARS)), st.integers(0, 10)),
    st.tuples(st.just("quarantine"), st.sampled_from(sorted(_CARS))),
)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@settings(max_examples=60, deadline=None, database=None)
@given(ops=st.lists(_ledger_op, min_size=1, max_size=30))
def test_ledger_postings_sum_to_zero_and_settle_each_charge_once(
    backend: str, ops: list[tuple[Any, ...]], request: pytest.FixtureRequest
) -> None:
    """Random histories of charges (some duplicated, some replayed), verifications and
    quarantines, against a reference: balances sum to zero; a charge is posted once; it
    leaves escrow only when its car is verified through its work, and is reversed (customer
    refunded, owner unpaid) only if its car is caught before that."""
    with opened(BACKENDS[backend](request)) as s:
        verified: dict[str, float] = {}
        accounts = Accounts(
            s, LEDGER_PRICES, clock=lambda: NOW, verified_through=lambda v: verified.get(v, -1.0)
        )
        accounts._owners.update(_CARS)
        posted: list[Any] = []
        state: dict[str, str] = {}  # charge id -> "escrow" | "release" | "reversal"
        charges: dict[str, Any] = {}
        for op in ops:
            if op[0] == "charge":
                _, k, car, work_at, tokens = op
                work = Work(f"w{k}", "acme", car, _CARS[car], "m", 1, tokens, 0, 0.0, work_at)
                entry = charge_entry(work, LEDGER_PRICES, NOW)
                accounts.online_finished(work)
                if entry.id not in charges:  # a duplicate of posted work changes nothing
                    charges[entry.id] = entry
                    ok = verified.get(car, -1.0) >= work_at
                    state[entry.id] = "release" if ok else "escrow"
            elif op[0] == "replay" and posted:
                s.post_entries([posted[op[1] % len(posted)]])
            elif op[0] == "verify":
                _, car, through = op
                verified[car] = max(verified.get(car, -1.0), through)
                accounts.verified(car, verified[car])
                for cid, c in charges.items():
                    if c.vehicle_id == car and state[cid] == "escrow" and c.work_at <= through:
                        state[cid] = "release"
            elif op[0] == "quarantine":
                accounts.quarantined(op[1], NOW)
                for cid, c in charges.items():
                    if c.vehicle_id == op[1] and state[cid] == "escrow":
                        state[cid] = "reversal"
            accounts.flush()
            posted = s.ledger_entries()
            balances = s.balances()
            assert sum(balances.values()) == 0
            assert all(sum(a for _, a in e.postings) == 0 for e in posted)
            kinds = Counter(e.kind for e in posted)
            assert kinds["charge"] == len(charges)
            settled = {e.settles: e.kind for e in posted if e.settles is not None}
            assert kinds["release"] + kinds["reversal"] == len(settled)  # each at most once
            assert {cid: settled.get(cid, "escrow") for cid in charges} == state
            for owner in set(_CARS.values()):
                mine = [c for c in charges.values() if c.owner == owner]
                held = sum(c.earned for c in mine if state[c.id] == "escrow")
                paid = sum(c.earned for c in mine if state[c.id] == "release")
                assert balances.get(f"escrow:{owner}", 0) == held
                assert balances.get(f"owner:{owner}", 0) == paid
            owed = sum(c.charged for c in charges.values() if state[c.id] != "reversal")
            assert balances.get("customer:acme", 0) == -owed


def test_ledger_entries_filter_and_settlements_come_back_with_their_charge(store: Store) -> None:
    work = Work("batch:b1:car-1", "acme", "car-1", "alice", "m", 3, 2500, 100, 7.2e6, 5.0, "b1")
    charge = charge_entry(work, LEDGER_PRICES, NOW)
    assert store.post_entries([charge, charge]) == 1
    assert store.unsettled_charges("car-1") == [charge]
    assert store.unsettled_charges("car-1", through=4.0) == []
    assert store.ledger_entries(batch_id="b1") == [charge]
    assert store.ledger_entries(owner="bob") == []
    assert store.balances("customer:") == {"customer:acme": -charge.charged}


def test_ledger_entries_keep_and_filter_by_the_api_key(store: Store) -> None:
    keyed = charge_entry(
        Work("online:r1", "acme", "car-1", "alice", "m", 1, 10, 0, 0.0, 5.0, api_key_id="key_a"),
        LEDGER_PRICES,
        NOW,
    )
    other = charge_entry(
        Work("online:r2", "acme", "car-1", "alice", "m", 1, 10, 0, 0.0, 5.0), LEDGER_PRICES, NOW
    )
    release = release_entry(keyed, NOW + 1)
    store.post_entries([keyed, other, release])
    assert store.ledger_entries(api_key_id="key_a") == [keyed, release]
    assert release.api_key_id == "key_a"  # a settlement stays the charge's key's
    assert store.ledger_entries(api_key_id="key_b") == []


# -- the fleet at a glance (metrics, dashboard) --------------------------------------------------


def test_fleet_counts_count_batches_queue_leases_and_cars_by_status(store: Store) -> None:
    empty = store.fleet_counts(NOW)
    assert (empty.batches, empty.pending_requests, empty.active_leases) == ({}, 0, 0)
    assert (empty.live_cars, empty.offline_cars) == ({}, 0)

    add_batch(store, "batch-a", n=6)
    add_batch(store, "batch-b", n=4, created_at=int(NOW) + 1)
    add_batch(store, "batch-done", n=3, status="completed")  # its requests are no queue
    first = must_lease(store, "car-1", size=2)
    must_lease(store, "car-2", size=3)
    commit(store, first, seqs_of(first))  # finishes car-1's lease
    store.upsert_vehicles(
        [
            vehicle_record("car-1", status="working"),
            vehicle_record("car-2", status="working"),
            vehicle_record("car-3", status="paused"),
            vehicle_record("car-old", now=NOW - 600),
        ]
    )

    counts = store.fleet_counts(NOW - 60)

    assert counts.batches == {"in_progress": 2, "completed": 1}
    assert (counts.pending_requests, counts.leased_requests) == (10 - 2 - 3, 3)
    assert counts.active_leases == 1
    assert counts.live_cars == {"working": 2, "paused": 1}
    assert counts.offline_cars == 1
