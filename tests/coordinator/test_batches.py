"""Batch duties under replicas: claims, take-overs after a crash, one set of output files.

Two ``BatchService`` objects on one store stand for two coordinator replicas; each has its own
clock, so a claim running out is a clock moving, not a wait.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.batches import BatchLimits, BatchService
from idlefleet.coordinator.store import RequestResult, Store, open_store, sqlite_url
from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES

MODEL = "all-MiniLM-L6-v2"
CLAIM_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(sqlite_url(tmp_path / "c.db"))


def replica(store: Store, name: str, clock: Clock | None = None) -> BatchService:
    return BatchService(
        store, BatchLimits(claim_seconds=CLAIM_S), clock=clock or Clock(), replica=name
    )


def created(service: BatchService, n: int = 5) -> str:
    record = service.upload_file("in.jsonl", "batch", batch_input([f"t {i}" for i in range(n)]))
    return service.create_batch(record.id, "/v1/embeddings", "24h").id


def run_all(store: Store, batch_id: str, now: float) -> None:
    """Lease and commit every request of the batch, as cars would."""
    leased = store.lease_unit(
        "car-1",
        "lease-all",
        [MODEL],
        now,
        60,
        lambda n: n,
        purposes=PURPOSES,
        data_regions=DATA_REGIONS,
    )
    assert leased is not None and leased.batch_id == batch_id
    vector = np.zeros(384, dtype="<f4")
    vector[0] = 1.0
    results = [RequestResult(i.seq, vector.tobytes(), 2) for i in leased.items]
    store.commit_results("car-1", "lease-all", results, now, 60)


def test_two_replicas_finishing_one_batch_at_once_write_one_output(store: Store) -> None:
    a, b = replica(store, "a"), replica(store, "b")
    batch_id = created(a)
    a.validate(batch_id)
    run_all(store, batch_id, a.clock())
    start = threading.Barrier(2)

    def finish(service: BatchService) -> None:
        start.wait(5)
        service.maybe_finalize(batch_id)

    threads = [threading.Thread(target=finish, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    batch = a.get_batch(batch_id)
    assert batch.status == "completed" and batch.output_file_id
    assert [f.id for f in store.batch_files(batch_id)] == [batch.output_file_id]


def test_a_replica_that_dies_while_finalising_is_taken_over_and_its_file_discarded(
    store: Store,
) -> None:
    clock = Clock()
    dead, live = replica(store, "dead", clock), replica(store, "live", clock)
    batch_id = created(dead)
    dead.validate(batch_id)
    run_all(store, batch_id, clock())
    # The dead replica claimed the batch and wrote an output file, then died before finishing.
    owner = dead._claim(batch_id, ["in_progress"], status="finalizing")
    assert owner is not None
    with tempfile.TemporaryFile() as spool:
        spool.write(b'{"orphan": true}\n')
        orphan = dead._store_spool(spool, f"{batch_id}_output.jsonl", batch_id)

    live.sweep()  # the claim has not run out: nothing to take over yet
    still = live.get_batch(batch_id)
    clock.now += CLAIM_S + 1
    live.sweep()

    assert still.status == "finalizing"
    batch = live.get_batch(batch_id)
    assert batch.status == "completed" and batch.output_file_id not in (None, orphan)
    assert [f.id for f in store.batch_files(batch_id)] == [batch.output_file_id]
    assert store.get_file(orphan) is None
    lines = b"".join(store.read_file(batch.output_file_id)).splitlines()  # type: ignore[arg-type]
    assert len(lines) == 5


def test_an_attempt_that_lost_its_claim_discards_what_it_wrote(store: Store) -> None:
    clock = Clock()
    slow, fast = replica(store, "slow", clock), replica(store, "fast", clock)
    batch_id = created(slow)
    slow.validate(batch_id)
    run_all(store, batch_id, clock())
    owner = slow._claim(batch_id, ["in_progress"], status="finalizing")
    assert owner is not None
    clock.now += CLAIM_S + 1  # the slow one stalls past its claim
    fast.sweep()  # takes over and completes

    slow._write_results(batch_id, owner, "completed", completed_at=int(clock()))

    batch = fast.get_batch(batch_id)
    assert [f.id for f in store.batch_files(batch_id)] == [batch.output_file_id]


def test_a_batch_claimed_for_validation_is_left_to_its_claimant(store: Store) -> None:
    clock = Clock()
    first, second = replica(store, "first", clock), replica(store, "second", clock)
    batch_id = created(first)
    assert first._claim(batch_id, ["validating"]) is not None  # validating, then it died

    untouched = second.validate(batch_id)
    clock.now += CLAIM_S + 1
    taken_over = second.validate(batch_id)

    assert untouched.status == "validating"
    assert taken_over.status == "in_progress"
    assert store.request_counts(batch_id).pending == 5


def test_a_cancel_during_validation_is_finished_at_once(store: Store) -> None:
    a, b = replica(store, "a"), replica(store, "b")
    batch_id = created(a)
    owner = a._claim(batch_id, ["validating"])
    assert owner is not None

    b.cancel(batch_id)  # while a validates
    a.store.finish_batch(batch_id, ["validating"], owner, status="in_progress")  # a ends: too late
    b.maybe_finalize(batch_id)

    assert b.get_batch(batch_id).status == "cancelled"


class _RefusingStore:
    """The store, except that storing requests fails: with ``error`` (an exception) each time."""

    def __init__(self, store: Store, error: Exception) -> None:
        self._store, self.error, self.attempts = store, error, 0

    def add_requests(self, *args: object, **kwargs: object) -> int:
        self.attempts += 1
        raise self.error

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_batch_whose_requests_cannot_be_stored_fails_after_its_attempts(store: Store) -> None:
    refusing = _RefusingStore(store, UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"))
    service = BatchService(refusing, BatchLimits(validation_attempts=3))  # type: ignore[arg-type]
    batch_id = created(service)

    statuses = []
    for _ in range(5):  # the sweeper, once a second
        service.sweep()
        statuses.append(service.get_batch(batch_id).status)

    assert refusing.attempts == 3
    assert statuses[:2] == ["validating", "validating"] and statuses[2:] == ["failed"] * 3
    batch = service.get_batch(batch_id)
    assert batch.errors is not None
    (error,) = batch.errors["data"]
    assert error["code"] == "validation_error" and "UnicodeEncodeError" in error["message"]


def test_a_store_outage_while_validating_is_retried_not_counted(store: Store) -> None:
    from idlefleet.coordinator.store import StoreUnavailable

    refusing = _RefusingStore(store, StoreUnavailable("the database is restarting"))
    service = BatchService(refusing, BatchLimits(validation_attempts=2))  # type: ignore[arg-type]
    batch_id = created(service)

    for _ in range(4):
        service.sweep()

    assert refusing.attempts >= 1
    assert service.get_batch(batch_id).status == "validating"
    refusing.add_requests = store.add_requests  # type: ignore[method-assign]  # it is back
    later = time.time() + 2 * BatchLimits().claim_seconds  # the outage's claim has run out
    service.clock = lambda: later
    service.sweep()
    assert service.get_batch(batch_id).status == "in_progress"


def test_sweep_forgets_a_finished_batchs_request_rows_after_the_retention(store: Store) -> None:
    clock = Clock()
    service = BatchService(store, BatchLimits(request_retention_seconds=600), clock=clock)
    batch_id = created(service)
    service.validate(batch_id)
    run_all(store, batch_id, clock())
    service.maybe_finalize(batch_id)
    done = service.get_batch(batch_id)
    output = b"".join(service.file_content(done.output_file_id or ""))

    clock.now += 599
    service.sweep()
    kept = len(list(store.iter_requests(batch_id)))
    clock.now += 61  # past the retention, and a minute after the last look
    service.sweep()

    assert done.status == "completed" and kept == 5
    assert list(store.iter_requests(batch_id)) == []
    after = service.get_batch(batch_id)
    assert after.request_counts == done.request_counts
    assert b"".join(service.file_content(after.output_file_id or "")) == output
