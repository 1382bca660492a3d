"""Group commit for car messages: one blocking store call for everything that queued meanwhile.

Every durable write costs an fsync (~0.3-0.6 ms on these disks), so a coordinator that wrote
each car's result chunk or registration in its own transaction could not pass ~1,500 a second
whatever else it did. A :class:`BatchRunner` takes the items that arrived while its previous
call was running and hands them to one blocking call (in a worker thread), which commits them
in one transaction; then it answers each item. Under light load a batch is one item and adds no
delay; under heavy load batches grow and the fsync is shared.

``submit`` never waits, so the NATS callback that calls it returns at once and the next message
of the subscription is read: that is what lets batches form at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

__all__ = ["BatchRunner"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchRunner(Generic[T, R]):
    """Runs ``call(items) -> results`` (blocking, one result per item) on queued items.

    ``failed(item, exc)`` makes the answer for every item of a call that raised, so a store
    outage answers each car with an error instead of silence. ``executor`` runs the calls (the
    coordinator's store thread; None: asyncio's default pool).
    """

    def __init__(
        self,
        name: str,
        call: Callable[[list[T]], Sequence[R]],
        failed: Callable[[T, BaseException], R],
        max_batch: int = 256,
        executor: Executor | None = None,
    ) -> None:
        self.name = name
        self._executor = executor
        self._call = call
        self._failed = failed
        self._max_batch = max_batch
        self._queue: list[tuple[T, Callable[[R], Awaitable[None]]]] = []
        self._wake = asyncio.Event()
        self.batches = 0
        self.items = 0
        self.busy_s = 0.0
        """Time spent in ``call`` (worker thread), summed."""

    def submit(self, item: T, answer: Callable[[R], Awaitable[None]]) -> None:
        """Queue ``item``; ``answer(result)`` is awaited once its batch has run."""
        self._queue.append((item, answer))
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Serve until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                taken = self._queue[: self._max_batch]
                del self._queue[: len(taken)]
                items = [item for item, _ in taken]
                started = time.perf_counter()
                try:
                    loop = asyncio.get_running_loop()
                    results = list(await loop.run_in_executor(self._executor, self._call, items))
                    if len(results) != len(items):
                        raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)}")
                except Exception as exc:
                    log.warning("%s: a batch of %d failed: %s", self.name, len(items), exc)
                    results = [self._failed(item, exc) for item in items]
                self.batches += 1
                self.items += len(items)
                self.busy_s += time.perf_counter() - started
                for (_, answer), result in zip(taken, results, strict=True):
                    try:
                        await answer(result)
                    except Exception:  # one lost reply must not stop the others
                        log.exception("%s: answering failed", self.name)
