"""The agent's loops watched: one that ends stops the agent visibly, never silently."""

from __future__ import annotations

import asyncio

import pytest

from idlefleet.agent.supervise import AgentTaskDied, run_until_stopped


async def _forever(cancelled: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.append(name)
        raise


async def _fails_soon() -> None:
    await asyncio.sleep(0.01)
    raise ValueError("a bug in a loop")


async def _returns_soon() -> None:
    await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("loop", "cause"), [(_fails_soon, ValueError), (_returns_soon, None)], ids=["raises", "returns"]
)
def test_a_loop_that_ends_stops_the_others_and_says_which_and_why(loop, cause) -> None:  # type: ignore[no-untyped-def]
    cancelled: list[str] = []

    async def scenario() -> AgentTaskDied | None:
        stop = asyncio.Event()  # never set: only the dead loop can end this
        loops = {"heartbeats": _forever(cancelled, "heartbeats"), "run-units": loop()}
        return await asyncio.wait_for(run_until_stopped(loops, stop), timeout=5)

    died = asyncio.run(scenario())

    assert isinstance(died, AgentTaskDied) and died.name == "run-units"
    assert (type(died.cause) if died.cause is not None else None) is cause
    assert "run-units" in str(died)
    assert cancelled == ["heartbeats"]


def test_a_stop_ends_every_loop_and_reports_nothing() -> None:
    cancelled: list[str] = []

    async def scenario() -> AgentTaskDied | None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.02, stop.set)
        loops = {name: _forever(cancelled, name) for name in ("heartbeats", "tick")}
        return await run_until_stopped(loops, stop)

    assert asyncio.run(scenario()) is None
    assert sorted(cancelled) == ["heartbeats", "tick"]
