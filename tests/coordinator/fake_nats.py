"""A stand-in for the nats client and the subscriptions, to drive the coordinator's NATS edge
(:class:`~idlefleet.coordinator.nats_service.CoordinatorNats`) without a server: what it sends
is recorded, and each request is answered as a car would (``FakeNats.answer``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from idlefleet.coordinator.nats_service import CoordinatorNats
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.subjects import Uplink

__all__ = ["FakeNats", "FakeSubscription", "Reply", "UplinkMsg", "edge", "serve"]


@dataclass
class Reply:
    data: bytes
    headers: dict[str, str] | None = None


@dataclass
class FakeSubscription:
    nc: FakeNats
    subject: str

    async def next_msg(self, timeout: float) -> Reply:
        self.nc.waited.append(timeout)
        if isinstance(self.nc.answer, Exception):
            raise self.nc.answer
        return Reply(self.nc.answer)

    async def unsubscribe(self) -> None:
        return None


@dataclass
class FakeNats:
    """Answers each request (a subscription to a reply subject, then a publish with it) with
    ``answer`` (bytes) or raises it (an exception)."""

    answer: bytes | Exception = b""
    is_connected: bool = True
    sent: list[tuple[str, bytes, str]] = field(default_factory=list)
    """(subject, payload, reply subject) of every publish."""
    waited: list[float] = field(default_factory=list)

    async def flush(self, timeout: float) -> None:
        return None

    async def subscribe(self, subject: str, max_msgs: int = 0) -> FakeSubscription:
        return FakeSubscription(self, subject)

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.sent.append((subject, payload, reply))


@dataclass
class UplinkMsg:
    subject: str
    data: bytes
    reply: str = "_INBOX.1"
    responses: list[bytes] = field(default_factory=list)
    verb: Uplink | None = None
    """The subscription it arrives on, if not its subject's last token (a hostile subject)."""

    async def respond(self, data: bytes) -> None:
        self.responses.append(data)


def edge(work: WorkService, nc: FakeNats) -> CoordinatorNats:
    return CoordinatorNats(nc, work)  # type: ignore[arg-type]


def serve(coordinator: CoordinatorNats, *msgs: UplinkMsg, timeout: float = 10.0) -> None:
    """Deliver uplink messages as the subscriptions would (each to the handler of its verb,
    ``UplinkMsg.verb`` or its subject's last token), and wait until all are answered; fail if
    one is not within ``timeout`` seconds."""

    async def run() -> None:
        coordinator._loop = asyncio.get_running_loop()
        handlers = {
            Uplink.REGISTER: coordinator._on_register,
            Uplink.HEARTBEAT: coordinator._on_heartbeat,
            Uplink.WORK: coordinator._on_work,
            Uplink.RESULTS: coordinator._on_results,
            Uplink.RELEASE: coordinator._on_release,
            Uplink.PROGRESS: coordinator._on_progress,
            Uplink.POLICY: coordinator._on_policy,
        }
        runners = [
            asyncio.create_task(coordinator.dispatcher.run()),
            asyncio.create_task(coordinator.turns.run()),
            asyncio.create_task(coordinator.registrations.run()),
            asyncio.create_task(coordinator.lookups.run()),
        ]
        for msg in msgs:
            verb = msg.verb or Uplink(msg.subject.rsplit(".", 1)[1])
            await handlers[verb](msg)  # type: ignore[arg-type]
        deadline = asyncio.get_running_loop().time() + timeout
        while any(not m.responses for m in msgs if m.reply):
            assert asyncio.get_running_loop().time() < deadline, "a message was never answered"
            await asyncio.sleep(0.005)
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, *coordinator._tasks, return_exceptions=True)

    asyncio.run(run())
