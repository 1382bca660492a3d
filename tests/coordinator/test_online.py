"""The online router on a real nats-server, against scripted cars: it follows a request's
progress, moves it with that progress to the next car when a car stops, falls silent, is gone
or sends what fails a check, and gives up after ``max_cars`` cars."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from idlefleet.coordinator.errors import ServiceUnavailable
from idlefleet.coordinator.online import OnlineRouter
from idlefleet.embedded.nats_server import NatsServer, start_nats_server
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import RunReply, RunRequest, WireError, pack
from idlefleet.protocol.subjects import Downlink
from idlefleet.workloads.base import Cost, Planned, Probe, UnitRunner, Workload

pytestmark = pytest.mark.integration


class Echo(Workload):
    """Progress is any bytes but ``bad``; a result is any bytes but ``bad``."""

    kind = "chat"
    endpoint = "/v1/echo"

    def canonical_model(self, name: str) -> str | None:
        return name

    def plan(self, body: object) -> Planned:
        return Planned("m", body, "", Cost(1, 1, 1, 1))

    def expectation(self, payload: Any) -> Any:
        return None

    def check(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        tokens: Sequence[int],
        data: bytes,
    ) -> str | None:
        return "a bad result" if data == b"bad" else None

    def check_progress(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        data: bytes,
    ) -> str | None:
        return "bad progress" if data == b"bad" else None

    def work(self, payload: Any, result: bytes) -> int:
        return 1

    def probe(self, payload: Any, result: bytes, pick: int) -> Probe:
        return Probe(payload, result, 1)

    def agree(
        self, model: str, probe: Any, reference: bytes, answer: bytes, same_class: bool
    ) -> bool:
        return reference == answer

    def render_batch(self, requests: Sequence[Any]) -> Mapping[int, bytes]:
        return {}

    def render_online(self, planned: Planned, result: bytes, tokens: int) -> dict[str, Any]:
        return {}

    def models(self) -> tuple[str, ...]:
        return ("m",)

    def model_files(self, model: str) -> dict[str, Path]:
        return {}

    def provision(self, model: str, cache_dir: Path, source: Path | None = None) -> None:
        pass

    def runner(
        self, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        raise NotImplementedError


class Cars:
    """What the router asks of the work service: live cars, and a count of refusals."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.refused_results: Counter[str] = Counter()

    def online(self, model: str) -> list[str]:
        return list(self.ids)


Script = Callable[[Msg, RunRequest], Awaitable[None]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    running = start_nats_server(tmp_path_factory.mktemp("nats"))
    yield running
    running.stop()


async def reply(msg: Msg, message: RunReply) -> None:
    await msg.respond(encode(message))


def partial(data: bytes) -> RunReply:
    return RunReply(partial=True, progress_b64=pack(data))


def finish(data: bytes) -> RunReply:
    return RunReply(token_count=1, data_b64=pack(data))


class Watcher:
    def __init__(self, refuse: bytes | None = None) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.refuse = refuse

    def progress(self, data: bytes) -> None:
        if data == self.refuse:
            raise ValueError("does not follow")
        self.seen.append(("progress", data))

    def result(self, data: bytes, tokens: int) -> None:
        self.seen.append(("result", data))


def route(
    server: NatsServer,
    cars: Mapping[str, Script | None],
    watch: Watcher | None = None,
    max_cars: int = 5,
) -> tuple[bytes | Exception, list[RunRequest], OnlineRouter]:
    """Run one request through the router with these cars (None: not connected); what it
    returned (or raised), the requests each car got (in order) and the router."""
    asked: list[RunRequest] = []

    async def scenario() -> tuple[bytes | Exception, OnlineRouter]:
        nc = await nats.connect(server.url)
        router = OnlineRouter(nc, Cars(list(cars)), idle_timeout_s=0.5, max_cars=max_cars)  # type: ignore[arg-type]
        try:
            for vehicle_id, script in cars.items():
                if script is None:
                    continue

                async def on_run(msg: Msg, script: Script = script) -> None:
                    request = decode(RunRequest, msg.data)
                    asked.append(request)
                    await script(msg, request)

                await nc.subscribe(subjects.downlink(vehicle_id, Downlink.RUN), cb=on_run)
            await nc.flush()
            try:
                result, _ = await router.run(
                    Echo(), Planned("m", "hi", "", Cost(1, 1, 1, 1)), watch
                )
            except Exception as exc:
                return exc, router
            return result, router
        finally:
            await nc.close()

    result, router = asyncio.run(scenario())
    return result, asked, router


def test_progress_is_watched_and_the_result_returned(server: NatsServer) -> None:
    async def car(msg: Msg, request: RunRequest) -> None:
        await reply(msg, partial(b"p1"))
        await reply(msg, partial(b"p1p2"))
        await reply(msg, finish(b"done"))

    watch = Watcher()
    result, asked, router = route(server, {"car-a": car}, watch)

    assert result == b"done"
    assert watch.seen == [("progress", b"p1"), ("progress", b"p1p2"), ("result", b"done")]
    assert asked[0].progress_b64 is None and asked[0].stream
    assert router.snapshot() == {"online_finished": 1, "online_moved": {}}


async def stops_after(msg: Msg, request: RunRequest) -> None:
    await reply(msg, partial(b"p1"))
    await reply(
        msg,
        RunReply(
            progress_b64=pack(b"p1p2"),
            error=WireError(code="vehicle_paused", message="the driver is back"),
        ),
    )


async def finishes(msg: Msg, request: RunRequest) -> None:
    await reply(msg, partial((request.progress() or b"") + b"+more"))
    await reply(msg, finish(b"done"))


def test_a_car_that_stops_hands_its_progress_to_the_next(server: NatsServer) -> None:
    watch = Watcher()
    result, asked, router = route(server, {"car-a": stops_after, "car-b": finishes}, watch)

    assert result == b"done"
    assert [r.progress() for r in asked] == [None, b"p1p2"]
    assert watch.seen[-2:] == [("progress", b"p1p2+more"), ("result", b"done")]
    assert router.moved == {"stopped": 1}


def test_a_silent_car_loses_the_request_with_what_it_reported(server: NatsServer) -> None:
    async def silent(msg: Msg, request: RunRequest) -> None:
        await reply(msg, partial(b"p1"))  # then nothing: frozen, or killed

    result, asked, router = route(server, {"car-a": silent, "car-b": finishes})

    assert result == b"done"
    assert [r.progress() for r in asked] == [None, b"p1"]
    assert router.moved == {"silent": 1}


def test_a_car_that_is_not_connected_is_skipped_at_once(server: NatsServer) -> None:
    result, _, router = route(server, {"car-gone": None, "car-b": finishes})

    assert result == b"done"
    assert router.moved == {"gone": 1}


def test_progress_that_fails_a_check_is_not_kept_and_the_car_is_refused(
    server: NatsServer,
) -> None:
    async def lies(msg: Msg, request: RunRequest) -> None:
        await reply(msg, partial(b"p1"))
        await reply(msg, partial(b"bad"))

    result, asked, router = route(server, {"car-a": lies, "car-b": finishes})

    assert result == b"done"
    assert [r.progress() for r in asked] == [None, b"p1"]
    assert router.moved == {"refused": 1}
    assert router.work.refused_results == {"car-a": 1}


def test_what_the_watcher_cannot_follow_refuses_the_car(server: NatsServer) -> None:
    async def jumps(msg: Msg, request: RunRequest) -> None:
        await reply(msg, partial(b"elsewhere"))

    result, asked, router = route(
        server, {"car-a": jumps, "car-b": finishes}, Watcher(refuse=b"elsewhere")
    )

    assert result == b"done"
    assert [r.progress() for r in asked] == [None, None]
    assert router.moved == {"refused": 1}


def test_a_bad_result_moves_the_request_on(server: NatsServer) -> None:
    async def bad(msg: Msg, request: RunRequest) -> None:
        await reply(msg, finish(b"bad"))

    result, _, router = route(server, {"car-a": bad, "car-b": finishes})

    assert result == b"done"
    assert router.moved == {"refused": 1}


def test_after_max_cars_the_request_fails_with_the_last_reason(server: NatsServer) -> None:
    cars: dict[str, Script | None] = {f"car-{i}": stops_after for i in range(4)}

    result, asked, router = route(server, cars, max_cars=3)

    assert isinstance(result, ServiceUnavailable)
    assert "the driver is back" in result.message and result.code == "no_capacity"
    assert len(asked) == 3 and router.moved == {"stopped": 3}


def test_no_car_at_all_is_a_503_at_once(server: NatsServer) -> None:
    result, asked, _ = route(server, {})

    assert isinstance(result, ServiceUnavailable) and asked == []
