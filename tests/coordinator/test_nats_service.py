"""The NATS edge without a server: admission (budgets, garbage, unknown cars), the heartbeat
from memory, and the policy paths (uplink ``policy`` and the downlink push).

A stand-in for the nats client records what the edge sends and answers as a car would; the
real-server paths are covered by the integration tests.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.nats_service import YIELD_EVERY, CoordinatorNats, EdgeLimits
from idlefleet.coordinator.ratelimit import RateLimit
from idlefleet.coordinator.store import open_store, sqlite_url
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import (
    Ack,
    Hardware,
    Heartbeat,
    Progress,
    ProgressAck,
    RegisterRequest,
    WireError,
    WorkGrant,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import OwnerPolicy, PolicyUpdate
from idlefleet.protocol.subjects import Downlink, Uplink
from tests.coordinator.fake_nats import FakeNats, UplinkMsg, edge, serve


@pytest.fixture
def work(tmp_path: Path) -> WorkService:
    store = open_store(sqlite_url(tmp_path / "c.db"))
    return WorkService(store, BatchService(store))


def test_the_uplink_policy_request_answers_the_current_policy(work: WorkService) -> None:
    work.owners.set_consent("car-1", True, "owner:a", purposes=["research"])
    msg = UplinkMsg(subjects.uplink("car-1", Uplink.POLICY), b"{}")

    serve(edge(work, FakeNats()), msg)

    (reply,) = msg.responses
    update = decode(PolicyUpdate, reply)
    assert (update.version, update.policy.opted_in, update.policy.purposes) == (
        1,
        True,
        ["research"],
    )


def test_a_bad_policy_request_gets_an_error_and_no_policy(work: WorkService) -> None:
    msg = UplinkMsg(subjects.uplink("car-1", Uplink.POLICY), b'{"give": "me"}')

    serve(edge(work, FakeNats()), msg)

    (reply,) = msg.responses
    error = WireError.model_validate(json.loads(reply)["error"])
    assert error.code == "bad_message" and "give" in error.message
    assert set(json.loads(reply)) == {"error"}


UPDATE = PolicyUpdate(version=3, policy=OwnerPolicy(opted_in=False))


def test_push_policy_sends_the_update_on_the_cars_downlink(work: WorkService) -> None:
    nc = FakeNats(answer=encode(Ack(ok=True)))

    delivered = asyncio.run(edge(work, nc).push_policy("car-1", UPDATE))

    assert delivered is True
    ((subject, payload, reply),) = nc.sent
    assert subject == subjects.downlink("car-1", Downlink.POLICY)
    assert decode(PolicyUpdate, payload) == UPDATE
    # The answer comes back in the car's own reply namespace, the one its credentials allow.
    assert reply.startswith(f"{subjects.REPLY_PREFIX}.car-1.")
    assert nc.waited == [pytest.approx(1.0, abs=1.0)] and nc.waited[0] <= 1.0


@pytest.mark.parametrize(
    "answer",
    [
        nats.errors.NoRespondersError(),
        nats.errors.TimeoutError(),
        b"not json",
        encode(Ack(ok=False, error=WireError(code="bad_message", message="no"))),
    ],
    ids=["offline", "silent", "garbled", "refused"],
)
def test_a_push_the_car_does_not_take_is_reported_not_raised(
    work: WorkService, answer: Any
) -> None:
    nc = FakeNats(answer=answer)

    assert asyncio.run(edge(work, nc).push_policy("car-1", UPDATE)) is False
    assert len(nc.sent) == 1


def test_no_push_is_tried_without_a_connection(work: WorkService) -> None:
    nc = FakeNats(is_connected=False)

    assert asyncio.run(edge(work, nc).push_policy("car-1", UPDATE)) is False
    assert nc.sent == []


# -- admission: every message is checked before it costs anything -------------------------------


def _register(work: WorkService, vehicle_id: str = "car-1") -> None:
    work.register(
        vehicle_id,
        RegisterRequest(
            protocol_version=1,
            agent_version="t",
            hardware=Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=1),
            models=["all-MiniLM-L6-v2"],
        ),
    )


def _error_code(reply: bytes) -> str | None:
    error = json.loads(reply).get("error")
    return None if error is None else str(error["code"])


def test_a_flooding_car_is_refused_and_counted_and_others_are_not_slowed(
    work: WorkService,
) -> None:
    _register(work, "flooder")
    _register(work, "quiet")
    coordinator = CoordinatorNats(
        FakeNats(),  # type: ignore[arg-type]
        work,
        EdgeLimits(per_car=RateLimit(per_second=1, burst=5)),
    )
    beat = Heartbeat(seq=1, status="idle").model_dump_json().encode()
    flood = [UplinkMsg(subjects.uplink("flooder", Uplink.HEARTBEAT), beat) for _ in range(50)]
    quiet = UplinkMsg(subjects.uplink("quiet", Uplink.HEARTBEAT), beat)

    serve(coordinator, *flood, quiet)

    codes = [_error_code(m.responses[0]) for m in flood]
    assert codes.count(None) == 5 and codes.count("rate_limited") == 45
    assert _error_code(quiet.responses[0]) is None
    assert coordinator.stats.refused["rate_limited"] == 45


@pytest.mark.parametrize(
    ("verb", "payload"),
    [
        (Uplink.HEARTBEAT, b"\xff\xfe not json"),
        (Uplink.WORK, b'{"max_requests": -1, "models": []}'),
        (Uplink.RESULTS, b'{"lease_id": "x"}'),
        (Uplink.REGISTER, b"[]"),
        (Uplink.RELEASE, b"{}" * 10),
        # Found by the fuzzer (test_edge_fuzz.py), each once a failure beyond one message:
        # a seq past PostgreSQL's bigint failed the whole store turn,
        (
            Uplink.RESULTS,
            b'{"lease_id": "l", "seqs": [9223372036854775808], "token_counts": [0],'
            b' "sizes": [0], "data_b64": ""}',
        ),
        # a NUL in text failed every later liveness flush (PostgreSQL),
        (Uplink.HEARTBEAT, b'{"seq": 1, "status": "paused", "reason": "a\\u0000b"}'),
        # a refusal quoting a 3,000-digit version failed the registrations batched with it.
        (
            Uplink.REGISTER,
            b'{"protocol_version": 1' + b"0" * 3000 + b', "agent_version": "a", '
            b'"hardware": {"accelerator": "cpu", "tops": 1, "memory_gb": 1, '
            b'"power_w": 1}, "models": []}',
        ),
    ],
)
def test_garbage_on_an_uplink_subject_is_refused_with_the_reason(
    work: WorkService, verb: Uplink, payload: bytes
) -> None:
    msg = UplinkMsg(subjects.uplink("car-1", verb), payload)
    coordinator = edge(work, FakeNats())

    serve(coordinator, msg)

    (reply,) = msg.responses
    assert _error_code(reply) == "bad_message"
    assert coordinator.stats.refused["bad_message"] == 1


def test_a_subject_with_an_impossible_car_id_is_refused(work: WorkService) -> None:
    msg = UplinkMsg("idlefleet.v1.uplink.car*1.heartbeat", b"{}")
    coordinator = edge(work, FakeNats())

    serve(coordinator, msg)

    assert _error_code(msg.responses[0]) == "bad_subject"
    assert coordinator.stats.refused["bad_subject"] == 1


@pytest.mark.parametrize("verb", [Uplink.HEARTBEAT, Uplink.WORK])
def test_a_car_that_never_registered_is_told_so(work: WorkService, verb: Uplink) -> None:
    payload = {
        Uplink.HEARTBEAT: Heartbeat(seq=1, status="idle"),
        Uplink.WORK: WorkRequest(max_requests=1, models=["all-MiniLM-L6-v2"]),
    }[verb]
    msgs = [
        UplinkMsg(subjects.uplink("ghost", verb), payload.model_dump_json().encode())
        for _ in range(3)
    ]
    coordinator = edge(work, FakeNats())

    serve(coordinator, *msgs)

    assert [_error_code(m.responses[0]) for m in msgs] == ["not_registered"] * 3


def test_a_known_cars_heartbeat_is_answered_from_memory(work: WorkService) -> None:
    _register(work)
    work.owners.set_consent("car-1", True, "owner:a")
    msg = UplinkMsg(
        subjects.uplink("car-1", Uplink.HEARTBEAT),
        Heartbeat(seq=1, status="paused", reason="not_charging").model_dump_json().encode(),
    )
    work.store.close()  # any store read from here on would fail

    serve(edge(work, FakeNats()), msg)

    ack = decode(Ack, msg.responses[0])
    assert ack.ok and ack.policy_version == 1
    car = work.registry.get("car-1")
    assert car is not None and (car.status, car.status_reason) == ("paused", "not_charging")


def test_a_replica_stopping_answers_its_parked_work_requests(work: WorkService) -> None:
    _register(work)
    work.owners.set_consent("car-1", True, "owner:a")
    poll = WorkRequest(max_requests=1, models=["all-MiniLM-L6-v2"], wait_s=30)
    msg = UplinkMsg(subjects.uplink("car-1", Uplink.WORK), poll.model_dump_json().encode())
    coordinator = edge(work, FakeNats())

    async def scenario() -> int:
        coordinator._loop = asyncio.get_running_loop()
        runners = [
            asyncio.create_task(coordinator.dispatcher.run()),
            asyncio.create_task(coordinator.turns.run()),
        ]
        await coordinator._on_work(msg)
        for _ in range(200):  # the round finds no work; the request is parked for 30 s
            asks = coordinator.dispatcher._by_vehicle.values()
            # (The store turn ends a moment before the round puts the ask back.)
            if asks and coordinator.turns.turns != 0 and not any(a.in_round for a in asks):
                break
            await asyncio.sleep(0.01)
        parked = coordinator.dispatcher.parked
        await coordinator.stop()
        for task in runners:
            task.cancel()
        return parked

    parked = asyncio.run(scenario())

    assert parked == 1
    (reply,) = msg.responses
    grant = WorkGrant.model_validate_json(reply)
    assert grant.lease_id is None and grant.error is None and grant.retry_after_s == 0


def test_a_backlog_on_one_subscription_lets_the_rest_of_the_edge_run(work: WorkService) -> None:
    """A subscription hands its messages to the handler one after the other without giving up
    the event loop when nothing has to wait (a heartbeat is answered from memory); the edge
    gives it up every ``YIELD_EVERY`` messages, so answers of store turns and other verbs are
    not held behind a burst."""
    _register(work)
    beat = Heartbeat(seq=1, status="idle").model_dump_json().encode()
    msgs = [UplinkMsg(subjects.uplink("car-1", Uplink.HEARTBEAT), beat) for _ in range(200)]
    coordinator = edge(work, FakeNats())
    handled = 0
    other_ran_after: list[int] = []

    async def drain() -> None:
        nonlocal handled
        coordinator._loop = asyncio.get_running_loop()
        asyncio.get_running_loop().call_soon(lambda: other_ran_after.append(handled))
        for msg in msgs:  # as nats-py's subscription task does: await the handler, next
            await coordinator._on_heartbeat(msg)  # type: ignore[arg-type]
            handled += 1

    asyncio.run(drain())

    assert all(len(m.responses) == 1 for m in msgs)
    assert other_ran_after and other_ran_after[0] <= YIELD_EVERY


def test_progress_is_admitted_and_answered_by_the_work_service(work: WorkService) -> None:
    _register(work)
    report = Progress(lease_id="lease-x", seqs=[0], sizes=[2], data_b64=pack(b"ok"))
    ok = UplinkMsg(subjects.uplink("car-1", Uplink.PROGRESS), encode(report))
    garbage = UplinkMsg(subjects.uplink("car-1", Uplink.PROGRESS), b'{"lease_id": "x"}')

    serve(edge(work, FakeNats()), ok, garbage)

    # No such lease of this car: the work service's answer, through the edge.
    assert _error_code(ok.responses[0]) == "unknown_lease"
    assert decode(ProgressAck, ok.responses[0]).recorded == 0
    assert _error_code(garbage.responses[0]) == "bad_message"


def test_with_car_identities_a_car_is_answered_only_in_its_own_inbox(
    work: WorkService,
) -> None:
    # The reply subject is the one part of a car's message its NATS permissions do not
    # confine, and coordinators may publish anywhere: an answer elsewhere would let a car make
    # a coordinator purge a JetStream stream or talk on another car's subjects.
    limits = EdgeLimits(own_inbox_only=True)
    coordinator = CoordinatorNats(FakeNats(), work, limits)  # type: ignore[arg-type]
    subject = subjects.uplink("car-1", Uplink.POLICY)
    good = UplinkMsg(subject, b"{}", reply="_INBOX.car-1.Zx81")
    hostile = [
        UplinkMsg(subject, b"{}", reply=reply)
        for reply in (
            "$JS.API.STREAM.PURGE.OBJ_idlefleet-models",
            "_INBOX.car-2.Zx81",
            subjects.downlink("car-2", Downlink.POLICY),
            "_INBOX.car-1",
            "_INBOX.car-10.Zx81",
        )
    ]
    garbled = UplinkMsg(subject, b"not json", reply="$O.idlefleet-models.C.abc")

    serve(coordinator, good)

    async def deliver() -> None:
        coordinator._loop = asyncio.get_running_loop()
        for msg in [*hostile, garbled]:
            await coordinator._on_policy(msg)  # type: ignore[arg-type]
        await asyncio.gather(*coordinator._tasks, return_exceptions=True)

    asyncio.run(deliver())
    assert len(good.responses) == 1
    assert [m.responses for m in [*hostile, garbled]] == [[]] * 6
    assert coordinator.stats.refused["bad_reply"] == 6
