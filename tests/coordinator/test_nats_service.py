"""The NATS edge's policy paths (uplink ``policy`` and the downlink push), without a server.

A stand-in for the nats client records what the edge sends and answers as a car would; the
real-server paths are covered by the integration tests.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.nats_service import CoordinatorNats
from idlefleet.coordinator.store import open_store, sqlite_url
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import Ack, WireError
from idlefleet.protocol.policy import OwnerPolicy, PolicyUpdate
from idlefleet.protocol.subjects import Downlink, Uplink


@dataclass
class Reply:
    data: bytes


@dataclass
class FakeNats:
    """Answers requests with ``answer`` (bytes) or raises it (an exception)."""

    answer: bytes | Exception = b""
    is_connected: bool = True
    sent: list[tuple[str, bytes, float]] = field(default_factory=list)

    async def request(self, subject: str, payload: bytes, timeout: float) -> Reply:
        self.sent.append((subject, payload, timeout))
        if isinstance(self.answer, Exception):
            raise self.answer
        return Reply(self.answer)


@dataclass
class UplinkMsg:
    subject: str
    data: bytes
    reply: str = "_INBOX.1"
    responses: list[bytes] = field(default_factory=list)

    async def respond(self, data: bytes) -> None:
        self.responses.append(data)


@pytest.fixture
def work(tmp_path: Path) -> WorkService:
    store = open_store(sqlite_url(tmp_path / "c.db"))
    return WorkService(store, BatchService(store))


def edge(work: WorkService, nc: FakeNats) -> CoordinatorNats:
    return CoordinatorNats(nc, work)  # type: ignore[arg-type]


def test_the_uplink_policy_request_answers_the_current_policy(work: WorkService) -> None:
    work.owners.set_consent("car-1", True, "owner:a", purposes=["research"])
    msg = UplinkMsg(subjects.uplink("car-1", Uplink.POLICY), b"{}")

    asyncio.run(edge(work, FakeNats())._handle(msg))  # type: ignore[arg-type]

    (reply,) = msg.responses
    update = decode(PolicyUpdate, reply)
    assert (update.version, update.policy.opted_in, update.policy.purposes) == (
        1,
        True,
        ["research"],
    )


def test_a_bad_policy_request_gets_an_error_and_no_policy(work: WorkService) -> None:
    msg = UplinkMsg(subjects.uplink("car-1", Uplink.POLICY), b'{"give": "me"}')

    asyncio.run(edge(work, FakeNats())._handle(msg))  # type: ignore[arg-type]

    (reply,) = msg.responses
    error = WireError.model_validate(json.loads(reply)["error"])
    assert error.code == "bad_message" and "give" in error.message
    assert set(json.loads(reply)) == {"error"}


UPDATE = PolicyUpdate(version=3, policy=OwnerPolicy(opted_in=False))


def test_push_policy_sends_the_update_on_the_cars_downlink(work: WorkService) -> None:
    nc = FakeNats(answer=encode(Ack(ok=True)))

    delivered = asyncio.run(edge(work, nc).push_policy("car-1", UPDATE))

    assert delivered is True
    ((subject, payload, timeout),) = nc.sent
    assert subject == subjects.downlink("car-1", Downlink.POLICY)
    assert decode(PolicyUpdate, payload) == UPDATE
    assert timeout <= 1.0


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
