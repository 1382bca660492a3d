"""A poison input ends with a clear error at every stage that retries: none retries for ever.

The stages that try again after a failure, and what bounds each:

* validating a batch file: a validator that crashes fails the batch at once; storing its
  requests is tried ``BatchLimits.validation_attempts`` times (``test_batches.py``);
* leasing a request again after a car failed it (lease expired, released with an error, or
  returned as failed): ``Store.max_attempts``, then the request ends ``request_failed``;
* finalising (writing the output files): ``BatchLimits.finalization_attempts``, then the batch
  ends ``failed`` with a ``finalization_error``;
* an online request: ``OnlineRouter.max_cars`` cars, each for at most ``max_car_s``
  (``test_edge_fuzz.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.batch_input import parse_batch_input
from idlefleet.coordinator.batches import BatchLimits, BatchService
from idlefleet.coordinator.store import Store, StoredRequest, open_store, sqlite_url
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    Release,
    ResultChunk,
    WorkRequest,
    pack,
)

MODEL = "all-MiniLM-L6-v2"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path / "c.db"))
    yield opened
    opened.close()


class _UnreadableResults:
    """A store from which one batch's finished requests cannot be read back (as a result no
    code can render would be): every attempt at its output files fails."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.poisoned: set[str] = set()
        self.reads = 0

    def iter_requests(self, batch_id: str) -> Iterator[StoredRequest]:
        if batch_id in self.poisoned:
            self.reads += 1
            raise RuntimeError(f"cannot render the results of {batch_id}")
        return self._store.iter_requests(batch_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _finished_batch(batches: BatchService, work: WorkService, n: int = 2) -> str:
    """A batch whose every request has a committed result (its work is over)."""
    record = batches.upload_file("in.jsonl", "batch", batch_input([f"t {i}" for i in range(n)]))
    batch_id = batches.create_batch(record.id, "/v1/embeddings", "24h").id
    assert batches.validate(batch_id).status == "in_progress"
    grant = work.work("car-1", WorkRequest(max_requests=n, models=[MODEL]))
    assert grant.lease_id is not None and len(grant.items) == n
    vectors = np.eye(n, 384, dtype="<f4")
    chunk = ResultChunk(
        lease_id=grant.lease_id,
        seqs=[i.seq for i in grant.items],
        token_counts=[3] * n,
        sizes=[4 * 384] * n,
        data_b64=pack(vectors.tobytes()),
    )
    acks, _ = work.results_many([("car-1", chunk)])  # not finalised here: the test does it
    assert acks[0].committed == n
    return batch_id


def _register(work: WorkService) -> None:
    work.owners.set_consent("car-1", True, "owner:test")
    hardware = Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=1)
    reply = work.register(
        "car-1",
        RegisterRequest(protocol_version=1, agent_version="t", hardware=hardware, models=[MODEL]),
    )
    assert reply.accepted


def test_a_batch_whose_results_cannot_be_written_fails_after_its_attempts(store: Store) -> None:
    clock = Clock()
    unreadable = _UnreadableResults(store)
    limits = BatchLimits(finalization_attempts=3)
    batches = BatchService(unreadable, limits, clock=clock)  # type: ignore[arg-type]
    work = WorkService(unreadable, batches, clock=clock)  # type: ignore[arg-type]
    _register(work)
    poisoned = _finished_batch(batches, work)
    healthy = _finished_batch(batches, work)
    unreadable.poisoned.add(poisoned)

    batches.maybe_finalize(poisoned)  # what the edge does when a unit ends: attempt 1
    statuses = []
    for _ in range(4):  # then the sweeper, once a second
        batches.sweep()
        statuses.append(batches.get_batch(poisoned).status)
        clock.now += 1

    assert unreadable.reads == 3
    assert statuses == ["finalizing", "failed", "failed", "failed"]
    batch = batches.get_batch(poisoned)
    assert batch.errors is not None and batch.failed_at is not None
    (error,) = batch.errors["data"]
    assert error["code"] == "finalization_error" and "RuntimeError" in error["message"]
    assert batch.output_file_id is None and batch.error_file_id is None
    assert store.batch_files(poisoned) == []  # nothing half-written is left behind
    assert batches.get_batch(healthy).status == "completed"  # the other batch lost nothing


def test_a_finalisation_that_fails_once_succeeds_on_the_next_attempt(store: Store) -> None:
    clock = Clock()
    unreadable = _UnreadableResults(store)
    batches = BatchService(unreadable, BatchLimits(finalization_attempts=3), clock=clock)  # type: ignore[arg-type]
    work = WorkService(unreadable, batches, clock=clock)  # type: ignore[arg-type]
    _register(work)
    batch_id = _finished_batch(batches, work)
    unreadable.poisoned.add(batch_id)
    batches.maybe_finalize(batch_id)
    assert batches.get_batch(batch_id).status == "finalizing"

    unreadable.poisoned.clear()  # the store is readable again
    batches.sweep()

    finished = batches.get_batch(batch_id)
    assert finished.status == "completed" and finished.output_file_id is not None


def test_a_validator_that_crashes_on_a_file_fails_its_batch_at_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = BatchService(store)
    record = batches.upload_file("in.jsonl", "batch", batch_input(["a", "b"]))
    batch_id = batches.create_batch(record.id, "/v1/embeddings", "24h").id

    def crash(*args: object, **kwargs: object) -> None:
        raise RecursionError("a validator bug")

    monkeypatch.setattr("idlefleet.coordinator.batches.parse_batch_input", crash)
    batch = batches.validate(batch_id)

    assert batch.status == "failed" and batch.errors is not None
    (error,) = batch.errors["data"]
    assert error["code"] == "validation_error" and "RecursionError" in error["message"]
    monkeypatch.setattr("idlefleet.coordinator.batches.parse_batch_input", parse_batch_input)
    batches.sweep()
    assert batches.get_batch(batch_id).status == "failed"  # not validated again


def test_a_request_that_fails_on_every_car_ends_failed_and_its_batch_completes(
    store: Store,
) -> None:
    batches = BatchService(store)
    work = WorkService(store, batches)
    _register(work)
    record = batches.upload_file("in.jsonl", "batch", batch_input(["poison"]))
    batch_id = batches.create_batch(record.id, "/v1/embeddings", "24h").id
    batches.validate(batch_id)

    leases = 0
    for _ in range(store.max_attempts + 2):  # each car fails it: released with an error
        grant = work.work("car-1", WorkRequest(max_requests=1, models=[MODEL]))
        if grant.lease_id is None:
            break
        leases += 1
        ack = work.release("car-1", Release(lease_id=grant.lease_id, reason="error: oom"))
        assert ack.error is None

    assert leases == store.max_attempts
    batch = batches.get_batch(batch_id)
    assert batch.status == "completed" and batch.request_counts.failed == 1
    (row,) = store.iter_requests(batch_id)
    assert row.error_body is not None and row.error_body["error"]["code"] == "request_failed"
