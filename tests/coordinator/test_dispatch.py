"""The dispatcher without NATS or a store: parked requests, rounds, answers and the memo."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

from idlefleet.coordinator.dispatch import Dispatcher
from idlefleet.protocol.messages import WorkGrant, WorkItem, WorkRequest

MODEL = "all-MiniLM-L6-v2"


def ask(wait_s: float = 5.0) -> WorkRequest:
    return WorkRequest(max_requests=4, models=[MODEL], wait_s=wait_s)


class Queue:
    """A stand-in for the store's work: ``units`` leases to hand out, then nothing."""

    def __init__(self, units: int = 0) -> None:
        self.units = units
        self.rounds: list[list[str]] = []

    async def lease(self, asks: Sequence[tuple[str, WorkRequest]]) -> list[WorkGrant | None]:
        self.rounds.append([vehicle for vehicle, _ in asks])
        grants: list[WorkGrant | None] = []
        for vehicle, _ in asks:
            if self.units > 0:
                self.units -= 1
                grants.append(
                    WorkGrant(lease_id=f"lease-{vehicle}", items=[WorkItem(seq=0, payload=["x"])])
                )
            else:
                grants.append(None)
        return grants


def same_kind(vehicle_id: str, request: WorkRequest) -> Hashable:
    return tuple(request.models)


class Answers:
    def __init__(self) -> None:
        self.got: dict[str, list[WorkGrant]] = {}

    def to(self, vehicle_id: str):  # type: ignore[no-untyped-def]
        async def answer(grant: WorkGrant) -> None:
            self.got.setdefault(vehicle_id, []).append(grant)

        return answer


async def settle(dispatcher: Dispatcher, seconds: float = 0.05) -> None:
    """Let the dispatcher's loop and its worker thread run for a moment."""
    await asyncio.sleep(seconds)


def run(coroutine_factory):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine_factory())


def test_cars_asking_at_once_are_leased_in_one_round() -> None:
    async def scenario() -> tuple[Queue, Answers]:
        queue, answers = Queue(units=10), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind)
        task = asyncio.create_task(dispatcher.run())
        for i in range(5):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
        await settle(dispatcher)
        task.cancel()
        return queue, answers

    queue, answers = run(scenario)

    assert queue.rounds == [[f"car-{i}" for i in range(5)]]
    assert all(grants[0].lease_id == f"lease-{car}" for car, grants in answers.got.items())
    assert len(answers.got) == 5


def test_with_no_work_cars_of_a_kind_are_parked_after_one_store_round() -> None:
    async def scenario() -> tuple[Queue, Answers, Dispatcher]:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, round_size=8, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        for i in range(100):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
            await asyncio.sleep(0)
        await settle(dispatcher)
        task.cancel()
        return queue, answers, dispatcher

    queue, answers, dispatcher = run(scenario)

    # The first round finds nothing; the other 92 cars wait without a store round of their own.
    assert sum(len(r) for r in queue.rounds) <= 16
    assert answers.got == {}
    assert dispatcher.parked == 100


def test_announced_work_reaches_the_parked_cars() -> None:
    async def scenario() -> tuple[Queue, Answers]:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        for i in range(3):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
        await settle(dispatcher)
        queue.units = 2
        dispatcher.work_available()
        await settle(dispatcher)
        task.cancel()
        return queue, answers

    _, answers = run(scenario)

    granted = sorted(car for car, grants in answers.got.items() if grants[0].lease_id)
    assert len(granted) == 2
    assert len(answers.got) == 2  # the third still waits for its poll to end


def test_a_long_poll_ends_with_an_empty_answer_when_its_time_is_up() -> None:
    async def scenario() -> Answers:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        dispatcher.submit("car-1", ask(wait_s=0.1), answers.to("car-1"))
        await settle(dispatcher, 0.3)
        task.cancel()
        return answers

    answers = run(scenario)

    (grant,) = answers.got["car-1"]
    assert grant.lease_id is None and grant.error is None
    assert grant.retry_after_s == 0.0  # it waited already: it may ask again at once


def test_a_request_without_waiting_is_answered_at_once_when_nothing_is_known_there() -> None:
    async def scenario() -> tuple[Queue, Answers]:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        dispatcher.submit("car-1", ask(wait_s=0), answers.to("car-1"))
        await settle(dispatcher)
        dispatcher.submit("car-2", ask(wait_s=0), answers.to("car-2"))
        await settle(dispatcher)
        task.cancel()
        return queue, answers

    queue, answers = run(scenario)

    assert [len(answers.got[c]) for c in ("car-1", "car-2")] == [1, 1]
    assert answers.got["car-2"][0].retry_after_s > 0
    assert queue.rounds == [["car-1"]]  # car-2 was answered from the memo


def test_a_car_asking_again_gets_its_earlier_request_answered_empty() -> None:
    async def scenario() -> Answers:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        first, second = Answers(), Answers()
        dispatcher.submit("car-1", ask(), first.to("car-1"))
        await settle(dispatcher)
        dispatcher.submit("car-1", ask(), second.to("car-1"))
        await settle(dispatcher)
        queue.units = 1
        dispatcher.work_available()
        await settle(dispatcher)
        task.cancel()
        answers.got = {"first": first.got["car-1"], "second": second.got["car-1"]}
        return answers

    answers = run(scenario)

    assert [g.lease_id for g in answers.got["first"]] == [None]
    assert [g.lease_id for g in answers.got["second"]] == ["lease-car-1"]


def test_the_memo_runs_out_so_a_lost_announcement_only_delays_work() -> None:
    async def scenario() -> Answers:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, recheck_s=0.1)
        task = asyncio.create_task(dispatcher.run())
        dispatcher.submit("car-1", ask(wait_s=5), answers.to("car-1"))
        await settle(dispatcher)
        queue.units = 1  # work arrives, but nobody announces it
        await settle(dispatcher, 0.4)
        task.cancel()
        return answers

    answers = run(scenario)

    assert [g.lease_id for g in answers.got["car-1"]] == ["lease-car-1"]


def test_a_failing_round_answers_every_car_with_an_error() -> None:
    async def broken(asks: Sequence[tuple[str, WorkRequest]]) -> list[WorkGrant | None]:
        raise RuntimeError("store down")

    async def scenario() -> Answers:
        answers = Answers()
        dispatcher = Dispatcher(broken, same_kind)
        task = asyncio.create_task(dispatcher.run())
        for i in range(3):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
        await settle(dispatcher)
        task.cancel()
        return answers

    answers = run(scenario)

    assert len(answers.got) == 3
    assert all(
        g[0].error is not None and g[0].error.code == "internal" for g in answers.got.values()
    )


def test_kinds_with_work_are_not_held_up_by_kinds_without() -> None:
    def kind(vehicle_id: str, request: WorkRequest) -> Hashable:
        return vehicle_id.split("-")[0]  # "idle-…" and "busy-…"

    class Selective(Queue):
        async def lease(self, asks: Sequence[tuple[str, WorkRequest]]) -> list[WorkGrant | None]:
            self.rounds.append([v for v, _ in asks])
            return [
                WorkGrant(lease_id=f"lease-{v}") if v.startswith("busy") else None for v, _ in asks
            ]

    async def scenario() -> tuple[Selective, Answers]:
        queue, answers = Selective(), Answers()
        dispatcher = Dispatcher(queue.lease, kind, round_size=4, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        for i in range(50):
            dispatcher.submit(f"idle-{i}", ask(), answers.to(f"idle-{i}"))
        await settle(dispatcher)
        for i in range(10):
            dispatcher.submit(f"busy-{i}", ask(), answers.to(f"busy-{i}"))
        await settle(dispatcher)
        task.cancel()
        return queue, answers

    queue, answers = run(scenario)

    assert sorted(answers.got) == sorted(f"busy-{i}" for i in range(10))
    idle_asked = sum(1 for r in queue.rounds for v in r if v.startswith("idle"))
    assert idle_asked <= 8  # one round's worth, then the memo


def test_an_announcement_costs_a_kind_without_work_one_probe_not_a_round_per_car() -> None:
    async def scenario() -> tuple[Queue, Answers, Dispatcher]:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, round_size=8, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        for i in range(100):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
        await settle(dispatcher)
        before = len(queue.rounds)
        for _ in range(3):  # work for other kinds of cars, announced three times
            dispatcher.work_available()
            await settle(dispatcher)
        task.cancel()
        return queue, answers, before

    queue, answers, before = run(scenario)

    assert [len(r) for r in queue.rounds[before:]] == [1, 1, 1]
    assert answers.got == {}


def test_a_probe_that_finds_work_brings_the_rest_of_its_kind_at_once() -> None:
    async def scenario() -> tuple[Queue, Answers]:
        queue, answers = Queue(units=0), Answers()
        dispatcher = Dispatcher(queue.lease, same_kind, round_size=8, recheck_s=60)
        task = asyncio.create_task(dispatcher.run())
        for i in range(20):
            dispatcher.submit(f"car-{i}", ask(), answers.to(f"car-{i}"))
        await settle(dispatcher)
        queue.units = 20
        dispatcher.work_available()
        await settle(dispatcher)
        task.cancel()
        return queue, answers

    queue, answers = run(scenario)

    assert sorted(answers.got) == sorted(f"car-{i}" for i in range(20))
    assert all(grants[0].lease_id for grants in answers.got.values())
    # One round found nothing; after the announcement one probe, then the other 19 in rounds.
    assert [len(r) for r in queue.rounds] == [8, 1, 8, 8, 3]
