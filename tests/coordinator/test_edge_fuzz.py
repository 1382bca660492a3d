"""Every car → coordinator message, fuzzed (hypothesis), through the coordinator's real NATS edge.

Each uplink verb gets messages built from its structure (registrations, heartbeats, work
requests, result chunks and progress on leases the car really holds, releases, policy requests),
most of them then broken: a field dropped, added or replaced by a hostile value (huge integers,
``NaN`` and ``Infinity``, lone surrogates, deep nesting, oversized strings and lists, wrong
types), the bytes truncated or spliced with invalid UTF-8, the subject garbled. Each goes to the
edge's handler for its verb as the subscription would deliver it (decode, admission, the work
service on a real SQLite store, the store turn), and must be answered, within a bound, with its
reply or an error that names the problem: never ``internal`` (an unhandled exception turned
into an answer), never an error logged, never no answer. Then a good message of the same verb
must still work.

The car's answers to the coordinator's requests are fuzzed the same way: its online replies
(``RunReply``) through :class:`~idlefleet.coordinator.online.OnlineRouter`, where a request ends
with its result or a clear 503 after its last car whatever the cars send, and its answer to a
policy push (``Ack``), which is taken or reported, never raised.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.errors import ServiceUnavailable
from idlefleet.coordinator.nats_service import CoordinatorNats, EdgeLimits
from idlefleet.coordinator.online import OnlineRouter
from idlefleet.coordinator.ratelimit import RateLimit
from idlefleet.coordinator.store import Store, open_store, sqlite_url
from idlefleet.coordinator.store.postgres import PostgresStore
from idlefleet.coordinator.work import WorkService
from idlefleet.embedded.postgres import create_database, drop_database
from idlefleet.models.catalog import MINILM, SMOLLM2
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import MAX_MESSAGE_BYTES, decode, encode
from idlefleet.protocol.messages import (
    Ack,
    Hardware,
    Heartbeat,
    Progress,
    ProgressAck,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    RunReply,
    WireError,
    WireModel,
    WorkGrant,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import OwnerPolicy, PolicyUpdate
from idlefleet.protocol.subjects import Uplink
from idlefleet.workloads import WORKLOADS
from idlefleet.workloads.chat import encode_result
from tests.conftest import TEST_DATABASE_PREFIX
from tests.coordinator.fake_nats import FakeNats, UplinkMsg, serve
from tests.fuzzing import fuzz_settings
from tests.hostile import json_junk, spoiled

CAR = "car-1"
ONLINE_CARS = ("run-0", "run-1", "run-2")
"""Cars that take online requests (``CAR`` is busy being fuzzed)."""
KINDS = {"embeddings": MINILM.id, "chat": SMOLLM2.id}
REPLIES: dict[Uplink, type[WireModel]] = {
    Uplink.REGISTER: RegisterReply,
    Uplink.HEARTBEAT: Ack,
    Uplink.WORK: WorkGrant,
    Uplink.RESULTS: ResultAck,
    Uplink.RELEASE: ReleaseAck,
    Uplink.PROGRESS: ProgressAck,
    Uplink.POLICY: PolicyUpdate,
}
ANSWER_WITHIN_S = 10.0
"""A message unanswered this long (beyond the long poll it asked for) counts as a hang."""


# -- the coordinator the car talks to ------------------------------------------------------------


@dataclass
class Held:
    """A lease the car holds: its requests' seqs and what checking their results needs."""

    lease_id: str
    kind: str
    expected: dict[int, Any]


class Scene:
    """A coordinator's work service on SQLite, car ``CAR`` registered and opted in, and a lease
    of each workload that it holds (a new one whenever a message ended the last)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches = BatchService(self.store)
        self.work = WorkService(self.store, self.batches)
        self.replica = WorkService(self.store, BatchService(self.store))
        """Another coordinator replica on the same store: it did not grant the car's leases,
        so it reads what checking their results needs from the store."""
        for car in (CAR, *ONLINE_CARS):
            self.work.register(car, good_register())
        self.work.owners.set_consent(CAR, True, "owner:fuzz")
        self._held: dict[str, Held] = {}
        self._batches = 0

    def held(self, kind: str) -> Held:
        held = self._held.get(kind)
        lease = None if held is None else self.store.get_lease(CAR, held.lease_id)
        if held is None or lease is None or lease.state != "active":
            held = self._held[kind] = self._lease(kind)
        return held

    def _lease(self, kind: str) -> Held:
        workload = WORKLOADS[kind]
        for _ in range(3):
            grant = self.work.work(CAR, WorkRequest(max_requests=4, models=[KINDS[kind]]))
            if grant.lease_id is not None:
                expected = {i.seq: workload.expectation(i.payload) for i in grant.items}
                return Held(grant.lease_id, kind, expected)
            self._add_batch(kind)
        raise AssertionError(f"no {kind} work to lease: {grant}")

    def _add_batch(self, kind: str) -> None:
        self._batches += 1
        workload = WORKLOADS[kind]
        if kind == "embeddings":
            bodies = [{"model": MINILM.id, "input": [f"text {i}", "more"]} for i in range(64)]
        else:
            message = {"role": "user", "content": "Say hi."}
            bodies = [{"model": SMOLLM2.id, "messages": [message], "max_tokens": 4}] * 64
        lines = [
            json.dumps(
                {"custom_id": f"r{i}", "method": "POST", "url": workload.endpoint, "body": b}
            )
            for i, b in enumerate(bodies)
        ]
        file = self.batches.upload_file("in.jsonl", "batch", "\n".join(lines).encode())
        batch = self.batches.create_batch(file.id, workload.endpoint, "24h")
        assert self.batches.validate(batch.id).status == "in_progress"

    def close(self) -> None:
        self.store.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def scene(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    """The scene on each store backend (PostgreSQL: replicas share one; its types are
    narrower than Python's, e.g. ``bigint``)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("edge-fuzz") / "coordinator.db"
        made = Scene(open_store(sqlite_url(path)))
        yield made
        made.close()
        return
    admin = request.getfixturevalue("postgres_admin_dsn")
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
    made = Scene(PostgresStore(create_database(admin, name)))
    yield made
    made.close()
    drop_database(admin, name)


class ErrorLog(logging.Handler):
    """Collects the errors the coordinator logs (a refusal is a warning; an error is a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("idlefleet")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def errors_logged(error_log: ErrorLog) -> ErrorLog:
    """The errors logged during one test (``records`` empty at its start)."""
    error_log.records.clear()
    return error_log


def deliver(work: WorkService, *msgs: UplinkMsg, timeout: float = ANSWER_WITHIN_S) -> None:
    """Hand ``msgs`` to a fresh edge (its queues belong to one event loop) and wait for their
    answers; budgets are off, so every message reaches its handler."""
    limits = EdgeLimits(per_car=RateLimit(per_second=1e9, burst=1e9))
    coordinator = CoordinatorNats(FakeNats(), work, limits)  # type: ignore[arg-type]
    try:
        serve(coordinator, *msgs, timeout=timeout)
    finally:
        coordinator._store_thread.shutdown(wait=True)


# -- messages: valid ones, from each verb's structure --------------------------------------------


def good_register() -> RegisterRequest:
    hardware = Hardware(accelerator="cpu", tops=1, memory_gb=8, power_w=30)
    return RegisterRequest(
        protocol_version=1, agent_version="fuzz", hardware=hardware, models=list(KINDS.values())
    )


def unit_vectors(rows: int) -> bytes:
    return struct.pack(f"<{rows * MINILM.dim}f", *([1.0] + [0.0] * (MINILM.dim - 1)) * rows)


def result_of(held: Held, seq: int) -> tuple[bytes, int]:
    """A result of ``seq`` that its workload's check accepts, and its tokens."""
    if held.kind == "embeddings":
        rows = held.expected[seq]
        return unit_vectors(rows), rows
    prompt, _ = held.expected[seq]
    return encode_result([], "", "stop", prompt), prompt


def good_results(held: Held, seqs: list[int]) -> ResultChunk:
    results = [result_of(held, seq) for seq in seqs]
    return ResultChunk(
        lease_id=held.lease_id,
        seqs=seqs,
        token_counts=[tokens for _, tokens in results],
        sizes=[len(data) for data, _ in results],
        data_b64=pack(b"".join(data for data, _ in results)),
    )


def good_progress(held: Held, seqs: list[int]) -> Progress:
    parts = [json.dumps({"tokens": [1, 2]}).encode() for _ in seqs]
    return Progress(
        lease_id=held.lease_id,
        seqs=seqs,
        sizes=[len(p) for p in parts],
        data_b64=pack(b"".join(parts)),
    )


def good_message(scene: Scene, verb: Uplink) -> WireModel:
    """A message of ``verb`` that the coordinator must take without an error, now."""
    if verb is Uplink.REGISTER:
        return good_register()
    if verb is Uplink.HEARTBEAT:
        return Heartbeat(seq=1, status="idle")
    if verb is Uplink.WORK:
        return WorkRequest(max_requests=2, models=[MINILM.id])
    if verb is Uplink.RESULTS:
        held = scene.held("embeddings")
        return good_results(held, sorted(held.expected)[:1])
    if verb is Uplink.PROGRESS:
        held = scene.held("chat")
        return good_progress(held, sorted(held.expected)[:1])
    if verb is Uplink.RELEASE:
        return Release(lease_id=scene.held("embeddings").lease_id, reason="preempted: not_parked")
    return WireModel()  # PolicyRequest: no fields


# -- each verb's structure ------------------------------------------------------------------------


def verb_fields(draw: st.DrawFn, scene: Scene, verb: Uplink) -> dict[str, Any]:
    """A message of ``verb`` as a car builds it: valid in shape, its values drawn, on the
    leases the car holds now (or on one it does not)."""
    ints = st.integers(-5, 20_000)
    if verb is Uplink.REGISTER:
        return {
            "protocol_version": draw(st.sampled_from([1, 1, 1, 0, 2, -1])),
            "agent_version": draw(st.text(max_size=20)),
            "hardware": {
                "accelerator": draw(st.sampled_from(["cpu", "HW4", "AI5"])),
                "tops": draw(st.floats(0, 2e6)),
                "memory_gb": draw(st.floats(0, 5000)),
                "power_w": draw(st.floats(0, 2e5)),
            },
            "models": draw(st.lists(st.sampled_from([*KINDS.values(), "x", ""]), max_size=4)),
        }
    if verb is Uplink.HEARTBEAT:
        return {
            "seq": draw(ints),
            "status": draw(st.sampled_from(["idle", "working", "paused", "driving"])),
            "active_leases": draw(st.lists(st.text(max_size=10), max_size=3)),
            "reason": draw(st.none() | st.text(max_size=30) | st.just("not\x00parked")),
            "policy_version": draw(ints),
            "releases_refused": draw(ints),
        }
    if verb is Uplink.WORK:
        return {
            "max_requests": draw(st.integers(0, 10_001)),
            "min_requests": draw(st.integers(0, 10_001)),
            "models": draw(st.lists(st.sampled_from([*KINDS.values(), "gpt-4", ""]), max_size=3)),
            # A long poll is held for wait_s when there is no work, by design: short ones here.
            "wait_s": draw(st.floats(0, 0.2)),
        }
    if verb is Uplink.POLICY:
        return {}
    held = scene.held(draw(st.sampled_from(sorted(KINDS))))
    lease_id = draw(st.sampled_from([held.lease_id, held.lease_id, "lease_unknown"]))
    own = sorted(held.expected)
    strange = [10**6, 2**31, 2**63, 10**30]  # no request of any batch
    seqs = draw(st.lists(st.sampled_from([*own, *strange]), max_size=len(own) + 2, unique=True))
    if verb is Uplink.RELEASE:
        reason = draw(st.sampled_from(["shutdown", "preempted: not_parked", "error: oom"]))
        return {"lease_id": lease_id, "reason": reason, "energy_j": draw(st.floats(0, 10))}
    if verb is Uplink.PROGRESS:
        ids = st.lists(st.integers(-1, 60_000), max_size=6)
        parts = [json.dumps({"tokens": draw(ids)}).encode() for _ in seqs]
        return {
            "lease_id": lease_id,
            "seqs": seqs,
            "sizes": [len(p) for p in parts],
            "data_b64": base64.b64encode(b"".join(parts)).decode(),
        }
    # RESULTS: each a valid result, or one whose bytes or tokens the workload must refuse.
    results = []
    for seq in seqs:
        data, tokens = result_of(held, seq) if seq in held.expected else (b"", 0)
        spoil = draw(st.sampled_from(["none", "none", "tokens", "nan", "bytes", "json"]))
        if spoil == "tokens":
            tokens = draw(st.integers(0, 10**6))
        elif spoil == "nan" and held.kind == "embeddings":
            data = struct.pack("<f", float("nan")) + data[4:]
        elif spoil == "bytes":
            data = draw(st.binary(max_size=40))
        elif spoil == "json":
            data = json.dumps(draw(json_junk)).encode()
        results.append((data, tokens))
    return {
        "lease_id": lease_id,
        "seqs": seqs,
        "token_counts": [tokens for _, tokens in results],
        "sizes": [len(data) for data, _ in results],
        "data_b64": base64.b64encode(b"".join(data for data, _ in results)).decode(),
        "failed_seqs": draw(st.lists(st.sampled_from([*own, 7]), max_size=2)),
        "energy_j": draw(st.floats(0, 5)),
    }


SUBJECT_CARS = ["car 1", "car*1", "car.1", "", "c" * 65, "car-1\n", "čar", "car-1.x"]


@st.composite
def uplink_message(draw: st.DrawFn, scene: Scene, verb: Uplink) -> UplinkMsg:
    payload = draw(spoiled(verb_fields(draw, scene, verb)))
    subject = subjects.uplink(CAR, verb)
    if draw(st.integers(0, 19)) == 0:  # one in twenty on a subject no car may have
        subject = f"{subjects.PREFIX}.uplink.{draw(st.sampled_from(SUBJECT_CARS))}.{verb.value}"
    return UplinkMsg(subject, payload, verb=verb)


def check_answer(verb: Uplink, reply: bytes) -> WireError | None:
    """The answer is the verb's reply or an error that names the problem; which error."""
    body = json.loads(reply)
    if isinstance(body, dict) and body.get("error") is not None:
        error = WireError.model_validate(body["error"])
        assert error.code != "internal", f"an unhandled failure: {error.message}"
        assert error.message.strip(), f"error {error.code} says nothing"
        return error
    decode(REPLIES[verb], reply)
    return None


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.fuzz
@pytest.mark.parametrize("verb", list(Uplink), ids=[v.value for v in Uplink])
@fuzz_settings(40)
@given(data=st.data())
def test_any_message_is_answered_and_the_next_good_one_still_works(
    scene: Scene, errors_logged: ErrorLog, verb: Uplink, data: st.DataObject
) -> None:
    bad = data.draw(uplink_message(scene, verb), label="message")
    replica = data.draw(st.sampled_from([scene.work, scene.replica]), label="replica")

    deliver(replica, bad)
    good = UplinkMsg(subjects.uplink(CAR, verb), encode(good_message(scene, verb)))
    deliver(scene.work, good)

    (answer,) = bad.responses
    check_answer(verb, answer)
    assert check_answer(verb, good.responses[0]) is None, good.responses[0]
    replica.flush_liveness()  # what the edge let in, the store takes (a NUL did not)
    assert errors_logged.records == [], [r.getMessage() for r in errors_logged.records]


@pytest.mark.parametrize("verb", list(Uplink), ids=[v.value for v in Uplink])
def test_a_message_over_the_size_limit_is_refused_before_it_is_read(
    scene: Scene, verb: Uplink
) -> None:
    huge = UplinkMsg(subjects.uplink(CAR, verb), b"[" + b" " * MAX_MESSAGE_BYTES + b"]")

    deliver(scene.work, huge)

    error = check_answer(verb, huge.responses[0])
    assert error is not None and error.code == "bad_message" and "limit" in error.message


# -- online runs: what a car answers a RunRequest with -------------------------------------------


@dataclass
class ScriptedCars:
    """A stand-in for NATS on the online path: each car (in the order asked) answers its
    RunRequest with its script of replies, then falls silent."""

    scripts: list[list[bytes]]
    asked: list[str] = field(default_factory=list)

    async def subscribe(self, inbox: str) -> ScriptedCars.Inbox:
        car = len(self.asked)  # the car this inbox is for is asked next
        return ScriptedCars.Inbox(list(self.scripts[car]) if car < len(self.scripts) else [])

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.asked.append(subject)

    @dataclass
    class Inbox:
        replies: list[bytes]

        async def next_msg(self, timeout: float) -> Any:
            if not self.replies:
                raise nats.errors.TimeoutError
            return _Msg(self.replies.pop(0))

        async def unsubscribe(self) -> None:
            return None


@dataclass
class _Msg:
    data: bytes
    headers: dict[str, str] | None = None


@st.composite
def run_reply(draw: st.DrawFn, kind: str, expected: Any) -> bytes:
    if kind == "embeddings":
        data, tokens = unit_vectors(expected), expected
    else:
        data, tokens = encode_result([], "", "stop", expected[0]), expected[0]
    fields = draw(
        st.sampled_from(
            [
                {"partial": False, "token_count": tokens, "data_b64": pack(data)},
                {"partial": True, "progress_b64": pack(b'{"tokens": [5]}')},
                {"error": {"code": "preempted", "message": "the driver is back"}},
                {"partial": False, "token_count": 0, "data_b64": pack(b"\x00" * 7)},
            ]
        )
    )
    return draw(spoiled(fields))


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", sorted(KINDS))
@fuzz_settings(25)
@given(data=st.data())
def test_an_online_request_ends_whatever_its_cars_answer(
    scene: Scene, errors_logged: ErrorLog, kind: str, data: st.DataObject
) -> None:
    workload = WORKLOADS[kind]
    body: dict[str, Any]
    if kind == "embeddings":
        body = {"model": MINILM.id, "input": ["a", "b"]}
    else:
        body = {"model": SMOLLM2.id, "messages": [{"role": "user", "content": "hi"}]}
    planned = workload.plan(body)
    expected = workload.expectation(planned.payload)
    for car in ONLINE_CARS:
        scene.work.saw(car, "idle")  # live, whatever the time the examples before took
    scripts = data.draw(st.lists(st.lists(run_reply(kind, expected), max_size=4), max_size=3))
    nc = ScriptedCars(scripts)
    router = OnlineRouter(nc, scene.work, idle_timeout_s=0.01, max_cars=3)  # type: ignore[arg-type]

    async def run() -> tuple[bytes, int] | ServiceUnavailable:
        try:
            return await asyncio.wait_for(router.run(workload, planned), ANSWER_WITHIN_S)
        except ServiceUnavailable as refused:
            return refused

    outcome = asyncio.run(run())

    if isinstance(outcome, ServiceUnavailable):
        assert outcome.code == "no_capacity" and outcome.message
    else:
        result, tokens = outcome
        assert (
            workload.check(planned.model, [0], [expected], [len(result)], [tokens], result) is None
        )
    assert len(nc.asked) <= router.max_cars
    assert errors_logged.records == []


class ProgressForever(ScriptedCars):
    """Cars that answer with valid progress, the same, for ever, and never finish."""

    async def subscribe(self, inbox: str) -> ScriptedCars.Inbox:
        return ProgressForever.Endless([])

    class Endless(ScriptedCars.Inbox):
        async def next_msg(self, timeout: float) -> Any:
            await asyncio.sleep(0)
            return _Msg(encode(RunReply(partial=True, progress_b64=pack(b'{"tokens": [5]}'))))


def test_a_car_that_reports_progress_for_ever_loses_the_request(scene: Scene) -> None:
    workload = WORKLOADS["chat"]
    planned = workload.plan(
        {"model": SMOLLM2.id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    )
    for car in ONLINE_CARS:
        scene.work.saw(car, "idle")
    nc = ProgressForever([])
    router = OnlineRouter(nc, scene.work, max_cars=2, max_car_s=0.05)  # type: ignore[arg-type]

    async def run() -> None:
        await asyncio.wait_for(router.run(workload, planned), ANSWER_WITHIN_S)

    with pytest.raises(ServiceUnavailable) as refused:
        asyncio.run(run())

    assert "did not finish within 0.05 s" in refused.value.message
    assert len(nc.asked) == 2 and router.moved["slow"] == 2


@pytest.mark.fuzz
@fuzz_settings(40)
@given(answer=spoiled({"ok": True, "policy_version": 3, "error": None}))
def test_any_answer_to_a_policy_push_is_taken_or_reported_never_raised(
    scene: Scene, errors_logged: ErrorLog, answer: bytes
) -> None:
    update = PolicyUpdate(version=3, policy=OwnerPolicy(opted_in=True))
    edge = CoordinatorNats(FakeNats(answer=answer), scene.work)  # type: ignore[arg-type]
    try:
        delivered = asyncio.run(edge.push_policy(CAR, update))
    finally:
        edge._store_thread.shutdown(wait=True)

    assert isinstance(delivered, bool)
    assert errors_logged.records == []
