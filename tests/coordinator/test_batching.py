"""Group commit: items that queue while a call runs go into the next call together."""

from __future__ import annotations

import asyncio
import threading

from idlefleet.coordinator.batching import BatchRunner


def test_items_arriving_during_a_call_share_the_next_call() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def call(items: list[int]) -> list[int]:
        calls.append(items)
        gate.wait(5)  # the first call is slow, like an fsync
        return [i * 10 for i in items]

    async def scenario() -> dict[int, int]:
        runner = BatchRunner("test", call, lambda item, exc: -1)
        answers: dict[int, int] = {}

        def answer(i: int):  # type: ignore[no-untyped-def]
            async def done(result: int) -> None:
                answers[i] = result

            return done

        task = asyncio.create_task(runner.run())
        runner.submit(0, answer(0))
        await asyncio.sleep(0.05)
        for i in range(1, 6):
            runner.submit(i, answer(i))
        gate.set()
        while len(answers) < 6:
            await asyncio.sleep(0.01)
        task.cancel()
        return answers

    answers = asyncio.run(scenario())

    assert calls == [[0], [1, 2, 3, 4, 5]]
    assert answers == {i: i * 10 for i in range(6)}


def test_a_failing_call_answers_each_item_with_its_failure() -> None:
    def call(items: list[str]) -> list[str]:
        raise RuntimeError("database restarting")

    async def scenario() -> list[str]:
        runner = BatchRunner("test", call, lambda item, exc: f"{item}: {exc}")
        got: list[str] = []

        async def answer(result: str) -> None:
            got.append(result)

        task = asyncio.create_task(runner.run())
        runner.submit("a", answer)
        runner.submit("b", answer)
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        return got

    assert asyncio.run(scenario()) == ["a: database restarting", "b: database restarting"]
