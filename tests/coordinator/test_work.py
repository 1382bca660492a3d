"""The coordinator's work protocol over a real SQLite store, without sockets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.owners import OwnerService
from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.coordinator.store import open_store, sqlite_url
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import (
    CarFigures,
    Hardware,
    Heartbeat,
    Progress,
    RegisterRequest,
    Release,
    ResultChunk,
    WorkGrant,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import OwnerPolicy, PolicyRequest
from idlefleet.workloads.embeddings import EMBEDDINGS

MODEL = "all-MiniLM-L6-v2"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def services(tmp_path: Path, clock: Clock) -> tuple[BatchService, WorkService]:
    store = open_store(sqlite_url(tmp_path / "c.db"))
    batches = BatchService(store, clock=clock)
    work = WorkService(
        store, batches, UnitPolicy(min_requests=2, max_requests=8, lease_seconds=10), clock=clock
    )
    return batches, work


def _register(work: WorkService, vehicle_id: str, opted_in: bool = True) -> None:
    """Register a car; by default its owner has opted in (as the tests of leasing need)."""
    if opted_in:
        work.owners.set_consent(vehicle_id, True, "owner:test")
    reply = work.register(
        vehicle_id,
        RegisterRequest(
            protocol_version=1,
            agent_version="test",
            hardware=Hardware(accelerator="HW4", tops=50, memory_gb=8, power_w=80),
            models=[MODEL],
        ),
    )
    assert reply.accepted


def _batch(
    batches: BatchService, n: int, purpose: str = "general", data_region: str = "global"
) -> str:
    texts = [f"text {i}" for i in range(n)]
    record = batches.upload_file("in.jsonl", "batch", batch_input(texts))
    batch = batches.create_batch(
        record.id, "/v1/embeddings", "24h", purpose=purpose, data_region=data_region
    )
    assert batches.validate(batch.id).status == "in_progress"
    return batch.id


def _unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _results(
    grant: WorkGrant,
    vectors: np.ndarray | None = None,
    *,
    text_counts: list[int] | None = None,
    dim: int = 384,
    **over: object,
) -> ResultChunk:
    """The results of every request of ``grant``: ``text_counts[i]`` vectors of ``dim`` each
    (one each by default), as the agent sends them."""
    n = len(grant.items)
    counts = [1] * n if text_counts is None else text_counts
    fields = {
        "lease_id": grant.lease_id,
        "seqs": [i.seq for i in grant.items],
        "token_counts": [4] * n,
        "sizes": [4 * dim * c for c in counts],
        "data_b64": _pack(_unit_vectors(n) if vectors is None else vectors),
    }
    fields.update(over)
    return ResultChunk(**fields)  # type: ignore[arg-type]


def _pack(vectors: np.ndarray) -> str:
    return pack(np.ascontiguousarray(vectors, dtype="<f4").tobytes())


ASK = WorkRequest(max_requests=100, models=[MODEL])


def test_unregistered_vehicles_get_no_work(services: tuple[BatchService, WorkService]) -> None:
    batches, work = services
    _batch(batches, 4)
    grant = work.work("stranger", ASK)
    assert grant.lease_id is None and grant.error is not None
    assert grant.error.code == "not_registered"
    assert not work.heartbeat("stranger", Heartbeat(seq=1, status="idle")).ok


def test_a_batch_runs_to_completion_through_leases(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    batch_id = _batch(batches, 10)
    seen: list[int] = []
    while (grant := work.work("car-1", ASK)).lease_id is not None:
        assert 1 <= len(grant.items) <= 8
        seen += [i.seq for i in grant.items]
        ack = work.results("car-1", _results(grant))
        assert ack.error is None and ack.committed == len(grant.items)
    assert sorted(seen) == list(range(10))
    batch = batches.get_batch(batch_id)
    assert batch.status == "completed" and batch.output_file_id
    lines = b"".join(batches.file_content(batch.output_file_id)).splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(
        f"req-{i}" for i in range(10)
    )


def test_duplicate_and_late_results_change_nothing(
    services: tuple[BatchService, WorkService], clock: Clock
) -> None:
    batches, work = services
    _register(work, "car-1")
    _register(work, "car-2")
    _batch(batches, 4)
    first = work.work("car-1", WorkRequest(max_requests=2, models=[MODEL]))
    clock.now += 11  # car-1's lease expires; its requests go to car-2
    batches.sweep()
    second = work.work("car-2", WorkRequest(max_requests=2, models=[MODEL]))
    assert [i.seq for i in second.items] == [i.seq for i in first.items]
    late = work.results("car-1", _results(first, _unit_vectors(2, seed=1)))
    assert late.committed == 2 and not late.lease_active
    again = work.results("car-2", _results(second, _unit_vectors(2, seed=2)))
    assert (again.committed, again.duplicates) == (0, 2)


@pytest.mark.parametrize(
    ("vectors", "code"),
    [
        (np.full((2, 384), np.nan, dtype=np.float32), "bad_results"),
        (np.ones((2, 384), dtype=np.float32), "bad_results"),
    ],
    ids=["nan", "not-normalised"],
)
def test_implausible_results_are_refused(
    services: tuple[BatchService, WorkService], vectors: np.ndarray, code: str
) -> None:
    batches, work = services
    _register(work, "car-1")
    batch_id = _batch(batches, 2)
    grant = work.work("car-1", ASK)
    ack = work.results("car-1", _results(grant, vectors))
    assert ack.error is not None and ack.error.code == code
    assert batches.get_batch(batch_id).request_counts.completed == 0


def test_wrong_dimension_and_foreign_leases_are_refused(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    _register(work, "car-2")
    _batch(batches, 2)
    grant = work.work("car-1", ASK)
    small = np.eye(2, 8, dtype=np.float32)
    wrong_dim = work.results("car-1", _results(grant, small, dim=8))
    assert wrong_dim.error is not None and "dimension" in wrong_dim.error.message
    stolen = work.results("car-2", _results(grant))
    assert stolen.error is not None and stolen.error.code == "unknown_lease"


def test_release_returns_unfinished_work_at_once(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    _register(work, "car-2")
    batch_id = _batch(batches, 4)
    grant = work.work("car-1", ASK)
    assert len(grant.items) >= 2
    partial = _results(grant).model_copy(
        update={
            "seqs": [grant.items[0].seq],
            "token_counts": [3],
            "sizes": [4 * 384],
            "data_b64": _pack(_unit_vectors(1)),
        }
    )
    work.results("car-1", ResultChunk.model_validate(partial.model_dump()))
    ack = work.release("car-1", Release(lease_id=grant.lease_id, reason="preempted"))
    assert ack.released == len(grant.items) - 1
    releasable: list[int] = []
    while (regrant := work.work("car-2", ASK)).lease_id is not None:
        releasable += [i.seq for i in regrant.items]
    assert sorted(releasable) == [s for s in range(4) if s != grant.items[0].seq]
    assert batches.get_batch(batch_id).request_counts.completed == 1


# -- owner policy and consent --------------------------------------------------------------------


def test_a_car_whose_owner_never_opted_in_gets_no_lease(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1", opted_in=False)
    batch_id = _batch(batches, 4)

    grant = work.work("car-1", ASK)

    assert grant.lease_id is None and grant.items == []
    assert grant.error is not None and grant.error.code == "not_opted_in"
    assert grant.retry_after_s == 5
    assert batches.get_batch(batch_id).request_counts.pending == 4
    work.flush_liveness()  # liveness reaches the store in the coordinator's next flush
    car = work.store.get_vehicle("car-1")
    assert car is not None and (car.status, car.status_reason) == ("paused", "not_opted_in")


def test_opting_in_lets_the_car_lease_and_opting_out_stops_it(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1", opted_in=False)
    _batch(batches, 20)

    work.owners.set_consent("car-1", True, "owner:alice")
    leased = work.work("car-1", WorkRequest(max_requests=2, models=[MODEL]))
    work.owners.set_consent("car-1", False, "owner:alice")
    refused = work.work("car-1", WorkRequest(max_requests=2, models=[MODEL]))

    assert leased.lease_id is not None and leased.error is None
    assert (leased.purpose, leased.data_region) == ("general", "global")
    assert refused.lease_id is None
    assert refused.error is not None and refused.error.code == "not_opted_in"


@pytest.mark.parametrize(
    ("batch_tags", "consent"),
    [
        ({"purpose": "advertising"}, {"purposes": ["general", "research"]}),
        ({"data_region": "us"}, {"data_regions": ["eu", "global"]}),
    ],
    ids=["purpose", "data_region"],
)
def test_a_unit_goes_only_to_cars_whose_owner_allows_its_purpose_and_region(
    services: tuple[BatchService, WorkService],
    batch_tags: dict[str, str],
    consent: dict[str, list[str]],
) -> None:
    batches, work = services
    _register(work, "strict", opted_in=False)
    _register(work, "open", opted_in=False)
    work.owners.set_consent("strict", True, "owner:s", **consent)
    work.owners.set_consent("open", True, "owner:o")
    batch_id = _batch(batches, 6, **batch_tags)

    refused = work.work("strict", ASK)
    granted = work.work("open", ASK)

    assert refused.lease_id is None and refused.error is None  # simply no work it may take
    assert granted.lease_id is not None and granted.batch_id == batch_id
    expected = {"purpose": "general", "data_region": "global"} | batch_tags
    assert {"purpose": granted.purpose, "data_region": granted.data_region} == expected


def test_register_and_heartbeat_tell_the_car_its_policy_version(
    services: tuple[BatchService, WorkService],
) -> None:
    _, work = services
    first = work.register(
        "car-1",
        RegisterRequest(
            protocol_version=1,
            agent_version="t",
            hardware=Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=1),
            models=[MODEL],
        ),
    )
    work.owners.set_consent("car-1", True, "owner:alice")
    work.owners.set_consent("car-1", True, "owner:alice", purposes=["research"])

    ack = work.heartbeat("car-1", Heartbeat(seq=1, status="paused", reason="not_charging"))
    update = work.policy("car-1", PolicyRequest())

    assert first.policy_version == 0
    assert ack.ok and ack.policy_version == 2
    assert (update.version, update.policy.opted_in, update.policy.purposes) == (
        2,
        True,
        ["research"],
    )
    work.flush_liveness()  # liveness reaches the store in the coordinator's next flush
    car = work.store.get_vehicle("car-1")
    assert car is not None and (car.status, car.status_reason) == ("paused", "not_charging")


def test_a_car_with_no_policy_gets_the_cautious_default(
    services: tuple[BatchService, WorkService],
) -> None:
    _, work = services

    update = work.policy("car-new", PolicyRequest())

    assert update.version == 0 and update.policy == OwnerPolicy()
    assert not update.policy.opted_in


def test_energy_from_results_and_release_is_recorded_on_the_lease(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    _batch(batches, 4)
    grant = work.work("car-1", ASK)
    assert grant.lease_id is not None and len(grant.items) >= 2
    first = _results(grant).model_copy(
        update={
            "seqs": [grant.items[0].seq],
            "token_counts": [3],
            "sizes": [4 * 384],
            "data_b64": _pack(_unit_vectors(1)),
        }
    )

    work.results("car-1", ResultChunk.model_validate(first.model_dump() | {"energy_j": 40.0}))
    work.release(
        "car-1", Release(lease_id=grant.lease_id, reason="preempted: not_parked", energy_j=2.5)
    )

    lease = work.store.get_lease("car-1", grant.lease_id)
    assert lease is not None
    assert (lease.state, lease.end_reason, lease.energy_j) == (
        "released",
        "preempted: not_parked",
        42.5,
    )


def test_garbage_results_are_refused_alone_and_the_rest_of_the_turn_commits(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    _register(work, "car-2")
    batch_id = _batch(batches, 8)
    first = work.work("car-1", WorkRequest(max_requests=2, models=[MODEL]))
    second = work.work("car-2", WorkRequest(max_requests=2, models=[MODEL]))
    good = _results(second)
    wrong_chars = "!" * len(_results(first).data_b64)  # the right length, not base64
    bad = ResultChunk.model_validate(_results(first).model_dump() | {"data_b64": wrong_chars})

    (bad_ack, good_ack), _ = work.results_many([("car-1", bad), ("car-2", good)])

    assert bad_ack.error is not None and bad_ack.error.code == "bad_results"
    assert good_ack.error is None and good_ack.committed == len(second.items)
    assert batches.get_batch(batch_id).request_counts.completed == len(second.items)


def _two_input_batch(batches: BatchService) -> str:
    """Two requests of two inputs each."""
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": [f"a {i}", f"b {i}"]},
            }
        )
        for i in range(2)
    ]
    record = batches.upload_file("in.jsonl", "batch", "\n".join(lines).encode())
    batch = batches.create_batch(record.id, "/v1/embeddings", "24h")
    assert batches.validate(batch.id).status == "in_progress"
    return batch.id


@pytest.mark.parametrize("remembered", [True, False], ids=["granted-here", "granted-elsewhere"])
@pytest.mark.parametrize(
    ("text_counts", "token_counts", "words"),
    [
        ([1, 1], [4, 4], "2 input(s), the results have 1 vector(s)"),
        ([3, 1], [4, 4], "2 input(s), the results have 3 vector(s)"),
        ([2, 2], [4, 513], "513 tokens"),
    ],
    ids=["too-few-vectors", "too-many-vectors", "impossible-tokens"],
)
def test_results_that_do_not_match_their_requests_are_refused_and_counted_against_the_car(
    services: tuple[BatchService, WorkService],
    remembered: bool,
    text_counts: list[int],
    token_counts: list[int],
    words: str,
) -> None:
    batches, work = services
    _register(work, "car-1")
    batch_id = _two_input_batch(batches)
    grant = work.work("car-1", ASK)
    assert grant.lease_id is not None and len(grant.items) == 2
    if not remembered:  # as if another replica had granted it: the counts come from the store
        work._lease_infos = type(work._lease_infos)()

    chunk = _results(
        grant,
        _unit_vectors(sum(text_counts)),
        text_counts=text_counts,
        token_counts=token_counts,
    )
    ack = work.results("car-1", chunk)

    assert ack.error is not None and ack.error.code == "bad_results"
    assert words in ack.error.message
    assert work.refused_results["car-1"] == 1
    assert batches.get_batch(batch_id).request_counts.completed == 0
    right = _results(grant, _unit_vectors(4), text_counts=[2, 2], token_counts=[9, 9])
    assert work.results("car-1", right).committed == 2


# -- lease while validating ---------------------------------------------------------------------


def _varied_batch(batches: BatchService, n: int = 10) -> str:
    """``n`` one-text requests whose text lengths are all different (request i: i + 1 words)."""
    texts = [" ".join(["word"] * (i + 1)) for i in range(n)]
    record = batches.upload_file("in.jsonl", "batch", batch_input(texts))
    return batches.create_batch(record.id, "/v1/embeddings", "24h").id


def test_cars_lease_a_batch_while_its_requests_are_stored_largest_first(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    batches.limits = dataclasses.replace(batches.limits, first_slice=2, slice=3)
    _register(work, "car-1")
    batch_id = _varied_batch(batches)
    early: list[tuple[str, int, list[int]]] = []

    def cars_start() -> None:  # the first slice is stored; validation goes on after this
        batch = batches.get_batch(batch_id)
        grant = work.work("car-1", ASK)
        early.append((batch.status, batch.request_counts.total, [i.seq for i in grant.items]))
        assert work.results("car-1", _results(grant)).error is None

    batches.on_work = cars_start
    assert batches.validate(batch_id).status == "in_progress"

    # The car got the two largest requests while the batch was still validating.
    assert early == [("validating", 2, [9, 8])]
    assert batches.get_batch(batch_id).request_counts.total == 10
    seen = [9, 8]
    while (grant := work.work("car-1", ASK)).lease_id is not None:
        seen += [i.seq for i in grant.items]
        work.results("car-1", _results(grant))
    assert seen == list(range(9, -1, -1))  # largest first across slices, each once
    batch = batches.get_batch(batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == 10


def test_a_validation_that_dies_half_way_stores_only_the_rest_next_time(
    services: tuple[BatchService, WorkService], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches, work = services
    batches.limits = dataclasses.replace(batches.limits, first_slice=2, slice=3)
    batch_id = _varied_batch(batches)
    add = work.store.add_requests
    calls: list[int] = []

    def add_failing_once(batch: str, requests: Any) -> int:
        calls.append(len(requests))
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return add(batch, requests)

    monkeypatch.setattr(work.store, "add_requests", add_failing_once)

    assert batches.validate(batch_id).status == "validating"  # one failed attempt
    assert batches.get_batch(batch_id).request_counts.total == 2
    assert batches.validate(batch_id).status == "in_progress"

    assert calls == [2, 3, 3, 3, 2]  # the second attempt began after the stored slice
    rows = list(work.store.iter_requests(batch_id))
    assert sorted(r.custom_id for r in rows) == sorted(f"req-{i}" for i in range(10))


def test_a_batch_cancelled_while_its_requests_are_stored_stops_storing_and_ends_cancelled(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, _ = services
    batches.limits = dataclasses.replace(batches.limits, first_slice=2, slice=3)
    batch_id = _varied_batch(batches)
    batches.on_work = lambda: batches.cancel(batch_id) and None

    batches.validate(batch_id)
    batches.sweep()  # the claim was let go at once: the cancel finishes now

    batch = batches.get_batch(batch_id)
    assert batch.status == "cancelled"
    assert batch.request_counts.total == 2  # nothing stored after the cancel
    lines = b"".join(batches.file_content(batch.error_file_id or "")).splitlines()
    assert sorted(json.loads(line)["error"]["code"] for line in lines) == ["batch_cancelled"] * 2


# -- progress ------------------------------------------------------------------------------------


def _progress(grant: WorkGrant, parts: dict[int, bytes]) -> Progress:
    seqs = sorted(parts)
    return Progress(
        lease_id=grant.lease_id or "",
        seqs=seqs,
        sizes=[len(parts[s]) for s in seqs],
        data_b64=pack(b"".join(parts[s] for s in seqs)),
    )


def test_progress_of_a_workload_without_progress_is_refused_and_counted(
    services: tuple[BatchService, WorkService],
) -> None:
    batches, work = services
    _register(work, "car-1")
    _batch(batches, 2)
    grant = work.work("car-1", ASK)

    ack = work.progress("car-1", _progress(grant, {grant.items[0].seq: b"half"}))

    assert ack.error is not None and ack.error.code == "bad_progress"
    assert "report no progress" in ack.error.message
    assert work.refused_results["car-1"] == 1


def test_progress_is_kept_extends_the_lease_and_travels_to_the_next_car(
    services: tuple[BatchService, WorkService], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches, work = services
    # Embeddings report no progress; as a workload that does, accept any.
    monkeypatch.setattr(EMBEDDINGS, "check_progress", lambda *args: None)
    _register(work, "car-1")
    _register(work, "car-2")
    _batch(batches, 2)
    grant = work.work("car-1", ASK)
    first, second = (i.seq for i in grant.items)
    clock.now += 8

    ack = work.progress("car-1", _progress(grant, {first: b"\x00tokens so far\xff"}))

    assert ack.error is None and ack.recorded == 1 and ack.lease_active
    assert ack.lease_seconds == pytest.approx(10)  # extended from now, as a commit would
    stolen = work.progress("car-2", _progress(grant, {first: b"mine"}))
    assert stolen.error is not None and stolen.error.code == "unknown_lease"

    work.release("car-1", Release(lease_id=grant.lease_id or "", reason="preempted: not_parked"))
    regrant = work.work("car-2", ASK)
    carried = {i.seq: i.progress_b64 for i in regrant.items}
    assert carried == {first: pack(b"\x00tokens so far\xff"), second: None}
    # The grant goes through the wire as it is.
    assert decode(WorkGrant, encode(regrant)).items == regrant.items


def test_a_heartbeats_figures_are_counted_once_and_its_location_kept_in_memory(
    services: tuple[BatchService, WorkService], clock: Clock
) -> None:
    batches, work = services
    _register(work, "car-1")
    # Another replica on the same store: it must look the car up before it answers.
    other = WorkService(work.store, batches, clock=clock)
    other.metrics = Metrics()
    beat = Heartbeat(
        seq=1,
        status="working",
        figures=CarFigures(runs=4, compute_s=2.0, energy_j=160.0, preemptions=1, stop_s=[0.006]),
        location=(48.14, 11.58),
    )

    assert other.heartbeat_cached("car-1", beat) is None  # not known here yet
    ack = other.heartbeat("car-1", beat)

    assert ack.ok
    assert other.metrics.total(other.metrics.car_runs) == 4  # once, not twice
    assert other.metrics.total(other.metrics.car_preemptions) == 1
    [car] = other.known_cars(["car-1"])
    assert car.location == (48.14, 11.58) and car.status == "working"
    # A car nobody registered: refused, nothing counted.
    assert not other.heartbeat("car-ghost", beat).ok
    assert other.metrics.total(other.metrics.car_runs) == 4


def test_figures_of_a_known_car_whose_policy_version_is_not_cached_are_counted_once(
    services: tuple[BatchService, WorkService], clock: Clock
) -> None:
    _, work = services
    _register(work, "car-1")
    work.metrics = Metrics()
    work.owners = OwnerService(work.store, clock)  # a fresh cache: versions are read again
    beat = Heartbeat(seq=1, status="idle", figures=CarFigures(runs=2, compute_s=1.0))

    assert work.heartbeat("car-1", beat).ok
    assert work.heartbeat("car-1", beat).ok

    assert work.metrics.total(work.metrics.car_runs) == 4
