"""Verification through the coordinator's work protocol (real SQLite store, batches finalised
into real output files), with scripted cars: honest ones answer each text with its vector,
cheating ones with wrong vectors. The model's real outputs across hardware classes are the
workload's tests' and the benchmark's (``bench/verification.py``)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.coordinator.store import Enrolment, Store, open_store, sqlite_url
from idlefleet.coordinator.trust import TrustPolicy
from idlefleet.coordinator.verification import Verifier
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    Release,
    ResultChunk,
    WorkGrant,
    WorkRequest,
    pack,
)

MODEL = "all-MiniLM-L6-v2"
ASK = WorkRequest(max_requests=4, min_requests=4, models=[MODEL])


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(384)
    return (v / np.linalg.norm(v)).astype("<f4")


def noise(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384)
    return (v / np.linalg.norm(v)).astype("<f4")


@dataclass
class Car:
    id: str
    owner: str
    lie: Callable[[int], bool] = lambda seq: False
    """Answer this item (by seq) with a wrong vector."""
    grant: WorkGrant | None = None
    seqs_seen: list[list[int]] = field(default_factory=list)

    def answer(self) -> ResultChunk | None:
        if self.grant is None or self.grant.lease_id is None:
            return None
        parts, seqs, sizes = [], [], []
        for item in self.grant.items:
            texts = item.payload
            assert isinstance(texts, list)
            rows = [
                noise(item.seq * 7919 + i) if self.lie(item.seq) else vector(t)
                for i, t in enumerate(texts)
            ]
            data = np.stack(rows).tobytes()
            parts.append(data)
            seqs.append(item.seq)
            sizes.append(len(data))
        self.seqs_seen.append(seqs)
        return ResultChunk(
            lease_id=self.grant.lease_id,
            seqs=seqs,
            token_counts=[3] * len(seqs),
            sizes=sizes,
            data_b64=pack(b"".join(parts)),
        )


@dataclass
class Fleet:
    store: Store
    batches: BatchService
    work: WorkService
    verifier: Verifier
    clock: Clock
    cars: list[Car] = field(default_factory=list)

    def add(self, car: Car) -> Car:
        self.store.enrol(
            Enrolment(car.id, f"U{len(self.cars):055d}", car.owner, self.clock(), None, None)
        )
        self.work.owners.set_consent(car.id, True, "owner:test")
        reply = self.work.register(
            car.id,
            RegisterRequest(
                protocol_version=1,
                agent_version="test",
                hardware=Hardware(accelerator="cpu", tops=1, memory_gb=4, power_w=65),
                models=[MODEL],
            ),
        )
        assert reply.accepted
        self.cars.append(car)
        return car

    def batch(self, n: int, strict: bool = False, inputs: int = 2) -> str:
        lines = [
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": MODEL, "input": [f"text {i} {j}" for j in range(inputs)]},
                }
            )
            for i in range(n)
        ]
        record = self.batches.upload_file("in.jsonl", "batch", ("\n".join(lines) + "\n").encode())
        batch = self.batches.create_batch(
            record.id,
            "/v1/embeddings",
            "24h",
            metadata={"verification": "strict"} if strict else None,
        )
        assert self.batches.validate(batch.id).status == "in_progress"
        return batch.id

    def round(self, cars: list[Car] | None = None) -> None:
        """Every car sends the answers of its last unit and asks for the next."""
        cars = self.cars if cars is None else cars
        chunks = [(c.id, chunk) for c in cars if (chunk := c.answer()) is not None]
        self.clock.now += 1.0
        _, ended, grants = self.work.turn(chunks, [(c.id, ASK) for c in cars])
        for car, grant in zip(cars, grants, strict=True):
            car.grant = grant
        for batch_id in ended:
            self.batches.maybe_finalize(batch_id)

    def run(self, batch_id: str, rounds: int = 400) -> str:
        for _ in range(rounds):
            self.round()
            self.batches.sweep()
            status = self.store.get_batch(batch_id).status  # type: ignore[union-attr]
            if status in ("completed", "failed"):
                return status
        return self.store.get_batch(batch_id).status  # type: ignore[union-attr]

    def output(self, batch_id: str) -> dict[str, np.ndarray]:
        batch = self.store.get_batch(batch_id)
        assert batch is not None and batch.output_file_id is not None
        lines = b"".join(self.batches.file_content(batch.output_file_id)).splitlines()
        out = {}
        for line in lines:
            row = json.loads(line)
            out[row["custom_id"]] = np.array(
                [d["embedding"] for d in row["response"]["body"]["data"]], dtype=np.float32
            )
        return out


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    clock = Clock()
    store = open_store(sqlite_url(tmp_path / "c.db"))
    batches = BatchService(store, clock=clock)
    work = WorkService(
        store, batches, UnitPolicy(min_requests=4, max_requests=4, lease_seconds=30), clock=clock
    )
    verifier = Verifier(
        store,
        TrustPolicy(floor=0.2, new_car_checks=3, canary_trusted=0.2),
        clock=clock,
        rng=random.Random(5),
    )
    work.verifier = verifier
    batches.finalize_gate = verifier.may_finalize
    return Fleet(store, batches, work, verifier, clock)


def correct(fleet: Fleet, batch_id: str, n: int, inputs: int = 2) -> int:
    """How many output lines hold the right vectors; asserts nothing but probes' absence."""
    out = fleet.output(batch_id)
    assert set(out) == {f"req-{i}" for i in range(n)}  # probes never reach an output
    return sum(
        all(np.dot(out[f"req-{i}"][j], vector(f"text {i} {j}")) > 0.999 for j in range(inputs))
        for i in range(n)
    )


def test_honest_cars_check_each_other_and_earn_trust(fleet: Fleet) -> None:
    for i in range(4):
        fleet.add(Car(f"car-{i}", f"owner-{i % 2}"))
    batch_id = fleet.batch(200)
    assert fleet.run(batch_id) == "completed"
    assert correct(fleet, batch_id, 200) == 200
    status = fleet.verifier.status()
    counters = status["counters"]
    assert counters["answered"] > 20 and counters["agreed"] > 20
    assert counters.get("disagreed", 0) == 0 and counters.get("quarantined", 0) == 0
    assert {c["state"] for c in status["cars"]} == {"trusted"}
    # Probes went only to cars of the other owner.
    assert all(c["agreed"] > 0 for c in status["cars"])
    assert 0 < status["overhead"] < 1


def test_probes_never_go_to_a_car_of_the_same_owner(fleet: Fleet) -> None:
    a = fleet.add(Car("car-a", "owner-1"))
    b = fleet.add(Car("car-b", "owner-1"))
    fleet.verifier.hold_s = 1000.0
    batch_id = fleet.batch(40)
    for _ in range(30):
        fleet.round()
    # Two cars of one owner: nobody may check them, so nothing was placed or answered.
    assert fleet.verifier.counters["sampled"] > 0
    assert fleet.verifier.counters.get("answered", 0) == 0
    assert a.seqs_seen and b.seqs_seen
    # With no car about that may check them, the batch did not wait for its probes (they
    # would wait for nobody): it completed within those 30 rounds (s), not after hold_s.
    assert fleet.store.get_batch(batch_id).status == "completed"  # type: ignore[union-attr]
    assert fleet.verifier.counters["finalised_unchecked"] == 1


def test_a_finished_batch_waits_for_probes_a_car_about_may_take(fleet: Fleet) -> None:
    a = fleet.add(Car("car-a", "owner-1"))
    b = fleet.add(Car("car-b", "owner-2"))
    fleet.verifier.hold_s = 1000.0
    # Another owner's car is about: it asked for work a moment ago (and is busy meanwhile).
    fleet.verifier.asking([b.id])
    batch_id = fleet.batch(8)
    for _ in range(4):
        fleet.round([a])
    # a's work is done; the batch waits for b to take a's probes.
    assert fleet.verifier.counters["sampled"] > 0
    assert fleet.verifier.counters.get("answered", 0) == 0
    assert fleet.store.get_batch(batch_id).status == "in_progress"  # type: ignore[union-attr]
    assert fleet.run(batch_id, rounds=10) == "completed"
    assert fleet.verifier.counters["answered"] > 0
    assert fleet.verifier.counters.get("finalised_unchecked", 0) == 0


def test_a_cheater_is_quarantined_and_its_results_are_redone(fleet: Fleet) -> None:
    for i in range(3):
        fleet.add(Car(f"honest-{i}", f"owner-{i}"))
    cheater = fleet.add(Car("cheater", "owner-x", lie=lambda seq: True))
    batch_id = fleet.batch(300)
    assert fleet.run(batch_id) == "completed"
    trust = fleet.verifier.trust(cheater.id)
    assert trust.quarantined and trust.reason
    assert fleet.verifier.counters["redone"] > 0
    assert not any(fleet.verifier.trust(f"honest-{i}").quarantined for i in range(3))
    # Everything it returned before it was caught was redone by the others.
    assert correct(fleet, batch_id, 300) == 300
    # It is leased nothing more.
    fleet.round([cheater])
    assert cheater.grant is not None and cheater.grant.error is not None
    assert cheater.grant.error.code == "quarantined"
    cars = {c["vehicle_id"]: c for c in fleet.verifier.status()["cars"]}
    assert cars["cheater"]["state"] == "quarantined"


def test_a_verifier_that_lies_only_on_probes_is_caught_and_the_honest_car_is_not(
    fleet: Fleet,
) -> None:
    # No canaries: the liar must be caught by a tie-break (a canary would catch it too).
    fleet.verifier.policy = TrustPolicy(
        floor=0.2, new_car_checks=3, canary_new=0.0, canary_trusted=0.0
    )
    honest = [fleet.add(Car(f"honest-{i}", f"owner-{i}")) for i in range(3)]
    batch_id = fleet.batch(40)
    fleet.run(batch_id)  # the honest cars earn trust (tie-breaks go to trusted cars)

    def probes_only(seq: int) -> bool:
        # An oracle no car has (probes are numbered like the unit's requests): the worst case.
        assert liar.grant is not None and liar.grant.lease_id is not None
        return seq in (fleet.verifier.probe_seqs(liar.grant.lease_id) or {})

    liar = fleet.add(Car("liar", "owner-l", lie=probes_only))
    fleet.cars = [liar, *honest]  # it asks first: probes reach it before the others take them
    batch_id = fleet.batch(300)
    fleet.run(batch_id)
    for _ in range(10):  # the last tie-breaks run in units of probes alone
        fleet.round()
    assert fleet.verifier.trust("liar").quarantined
    assert not any(fleet.verifier.trust(c.id).quarantined for c in honest)
    assert fleet.verifier.counters["tiebreaks"] > 0
    assert correct(fleet, batch_id, 300) == 300


def test_cars_see_masked_request_numbers_and_a_made_up_one_is_refused(fleet: Fleet) -> None:
    car = fleet.add(Car("car-a", "owner-a"))
    fleet.batch(8)
    fleet.round()
    assert car.grant is not None and car.grant.lease_id is not None
    shown = [item.seq for item in car.grant.items]
    assert len(shown) == 4 and not set(shown) & set(range(8))  # not the batch's numbers
    chunk = car.answer()
    assert chunk is not None
    # A number the mask cannot give is refused; one it can (another request's, unknown to the
    # car) is a request the lease does not hold: not committed.
    beyond = chunk.model_copy(update={"seqs": [1 << 30, *chunk.seqs[1:]]})
    ack = fleet.work.results(car.id, beyond)
    assert ack.error is not None and ack.error.code == "bad_results"
    assert "not one of the lease's" in ack.error.message
    forged = chunk.model_copy(update={"seqs": [chunk.seqs[0] ^ 1, *chunk.seqs[1:]]})
    ack = fleet.work.results(car.id, forged)
    assert ack.error is None and ack.committed == 3
    ack = fleet.work.results(car.id, chunk)
    assert ack.error is None and (ack.committed, ack.duplicates) == (1, 3)


def test_a_strict_batch_waits_for_every_verdict_and_holds_no_wrong_result(fleet: Fleet) -> None:
    for i in range(3):
        fleet.add(Car(f"honest-{i}", f"owner-{i}"))
    # A car that cheats on one unit in three: some of its results are committed first.
    fleet.add(Car("sometimes", "owner-s", lie=lambda seq: seq % 3 == 0))
    batch_id = fleet.batch(120, strict=True)
    assert fleet.run(batch_id) == "completed"
    assert correct(fleet, batch_id, 120) == 120
    unverified = fleet.store.unverified_requests(batch_id)
    assert unverified == []


def test_a_strict_batch_is_held_while_its_results_are_unchecked(fleet: Fleet) -> None:
    only = fleet.add(Car("alone", "owner-1"))
    batch_id = fleet.batch(8, strict=True)
    for _ in range(10):
        fleet.round([only])
        fleet.batches.sweep()
    batch = fleet.store.get_batch(batch_id)
    assert batch is not None and batch.request_counts.completed == 8
    assert batch.status == "in_progress"  # nobody could check: not finalised
    fleet.add(Car("other", "owner-2"))
    assert fleet.run(batch_id) == "completed"
    assert correct(fleet, batch_id, 8) == 8


def test_a_strict_result_is_probed_once_however_often_the_gate_asks(fleet: Fleet) -> None:
    # A second probe of a result whose first is still out would race it: a disagreement (a
    # tie-break under way) and an agreement from another car, the first verdict standing.
    only = fleet.add(Car("alone", "owner-1"))
    batch_id = fleet.batch(8, strict=True)
    for _ in range(4):
        fleet.round([only])
        fleet.batches.sweep()
    batch = fleet.store.get_batch(batch_id)
    assert batch is not None and batch.request_counts.completed == 8
    assert fleet.verifier.counters["sampled"] == 8
    assert fleet.verifier.status()["queued"] == 8  # the gate asked, and queued none twice


def test_a_quarantined_verifiers_agreements_are_withdrawn_and_probed_again(
    fleet: Fleet,
) -> None:
    lying = False
    honest = [fleet.add(Car(f"honest-{i}", f"owner-{i}")) for i in range(3)]
    turncoat = fleet.add(Car("turncoat", "owner-t", lie=lambda seq: lying))
    fleet.run(fleet.batch(40))
    assert fleet.verifier.trust(turncoat.id).trusted(fleet.verifier.policy)
    batch_id = fleet.batch(200, strict=True)
    for _ in range(4):
        fleet.round()
    fleet.verifier.flush()
    vouched = [v for v in fleet.store.list_verdicts(batch_id) if v.verifier_id == turncoat.id]
    assert vouched  # it vouched for some of the strict batch's results...
    lying = True  # ...and then turns: everything it answers from here on is wrong
    assert fleet.run(batch_id) == "completed"
    assert fleet.verifier.trust(turncoat.id).quarantined
    assert not any(fleet.verifier.trust(c.id).quarantined for c in honest)
    # Its word no longer vouches for anything in the output: those results were probed again.
    assert fleet.verifier.counters["withdrawn"] >= len(vouched)
    verdicts = fleet.store.list_verdicts(batch_id)
    assert turncoat.id not in {v.verifier_id for v in verdicts}
    assert correct(fleet, batch_id, 200) == 200


def test_a_unit_of_probes_alone_holds_few_of_one_cars_results_and_a_canary(fleet: Fleet) -> None:
    cars = [fleet.add(Car(f"car-{i}", f"owner-{i}")) for i in range(3)]
    fleet.run(fleet.batch(40))  # trusted cars, and canaries their agreements left
    only, other = cars[0], cars[1]
    batch_id = fleet.batch(24, strict=True)
    for _ in range(7):
        fleet.round([only])
    assert fleet.store.request_counts(batch_id).completed == 24
    assert fleet.verifier.status()["queued"] == 24
    before = Counter(fleet.verifier.counters)
    fleet.round([other])  # no work left: a unit of probes alone
    assert other.grant is not None and other.grant.lease_id is not None
    placed = fleet.verifier.counters - before
    # At most eight of one car's results (a car lying on the unit vouches for few), and a
    # canary that catches a lie at once.
    assert (placed["placed_check"], placed["placed_canary"]) == (8, 1)
    assert len(other.grant.items) == 9


def test_probes_given_back_with_a_released_unit_are_placed_again(fleet: Fleet) -> None:
    a = fleet.add(Car("car-a", "owner-a"))
    b = fleet.add(Car("car-b", "owner-b"))
    fleet.batch(40)
    for _ in range(3):
        fleet.round()
    assert b.grant is not None and b.grant.lease_id is not None
    placed = fleet.verifier.probe_seqs(b.grant.lease_id) or {}
    fleet.work.release(b.id, Release(lease_id=b.grant.lease_id, reason="driving"))
    b.grant = None
    queued = sum(len(q) for q in fleet.verifier._queue.values())
    assert fleet.verifier.probe_seqs(b.grant.lease_id if b.grant else "x") is None
    assert queued >= len(placed)
    assert a.grant is not None


def test_a_new_car_on_probation_waits_for_its_checks_before_more_work(fleet: Fleet) -> None:
    fleet.verifier.policy = TrustPolicy(floor=0.2, new_car_checks=3, probation_backlog=3)
    a = fleet.add(Car("car-a", "owner-a"))
    fleet.batch(40)
    fleet.round([a])  # a unit of 4
    fleet.round([a])  # its 4 results committed, all queued as probes
    # Nobody about could verify it: its probes would wait for nobody, so it works on.
    assert not fleet.verifier.on_probation(a.id)
    fleet.round([a])
    assert a.grant is not None
    b = fleet.add(Car("car-b", "owner-b"))
    fleet.round([b])  # b's unit carries one of a's probes (a quarter of its unit)...
    assert fleet.verifier.on_probation(a.id)  # ...and b is about: a waits for the rest
    fleet.round([a])  # (the round that committed them had leased it its next unit already)
    fleet.round([a])
    assert a.grant is None  # no new unit for it while its checks are behind
    fleet.round([b])
    assert fleet.verifier.counters["answered"] >= 1
    for _ in range(8):
        fleet.round([b])
    assert not fleet.verifier.on_probation(a.id)
    fleet.round([a])
    assert a.grant is not None and a.grant.lease_id is not None
