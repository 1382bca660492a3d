"""The agent's long-running tasks, watched: one that ends on its own stops the agent visibly.

Each of the agent's loops (heartbeats, fetching units, running them, re-judging the car) runs
until the agent stops. If one raises or returns early, the process would otherwise stay up,
connected and heartbeating, doing nothing useful: a dead loop found only at shutdown. So
:func:`run_until_stopped` waits for the stop signal *or* the first task to end, cancels the
others, and reports which one ended and why; the agent then shuts down cleanly (its leases
released) and raises :class:`AgentTaskDied`, so the process exits non-zero and its supervisor
(systemd, the embedded fleet, a container runtime) sees it and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping
from typing import Any

__all__ = ["AgentTaskDied", "run_until_stopped"]


class AgentTaskDied(RuntimeError):
    """One of the agent's loops ended while the agent was meant to be running."""

    def __init__(self, name: str, cause: BaseException | None) -> None:
        why = "returned" if cause is None else f"raised {cause!r}"
        super().__init__(f"the agent's {name} task {why}; the agent stopped")
        self.name = name
        self.cause = cause


async def run_until_stopped(
    loops: Mapping[str, Coroutine[Any, Any, Any]], stop: asyncio.Event
) -> AgentTaskDied | None:
    """Run ``loops`` until ``stop`` is set (None) or one of them ends (its ``AgentTaskDied``).

    Every loop is cancelled and awaited before this returns.
    """
    tasks = {asyncio.create_task(coroutine, name=name): name for name, coroutine in loops.items()}
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [stopped, *tasks]:
            task.cancel()
        for task in [stopped, *tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    for task, name in tasks.items():
        if task in done:
            cause = None if task.cancelled() else task.exception()
            return AgentTaskDied(name, cause)
    return None
