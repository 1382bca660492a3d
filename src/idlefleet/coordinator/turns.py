"""The hot store work of one replica, in turns: one transaction for results and leases together.

Every durable write costs a commit, and on SQLite the commit (its fsync) is a large part of a
turn's time. So the result chunks that came in since the last turn and the dispatcher's round of
cars waiting for work go to the store together (:meth:`WorkService.turn`, on the store thread):
results first, which may finish units, then leases. Under light load a turn holds one message;
under heavy load turns grow and share the commit. ``submit_results`` never waits, so the NATS
callback that calls it returns at once and the next message is read; ``lease`` is awaited by
the dispatcher, which has at most one round in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor

from idlefleet.protocol.messages import ResultAck, ResultChunk, WireError, WorkGrant, WorkRequest

__all__ = ["StoreTurns"]

log = logging.getLogger(__name__)

Chunk = tuple[str, ResultChunk]
Ask = tuple[str, WorkRequest]
Turn = Callable[
    [Sequence[Chunk], Sequence[Ask]], tuple[list[ResultAck], set[str], list[WorkGrant | None]]
]


class StoreTurns:
    """Runs ``turn(chunks, asks)`` on ``executor`` for whatever queued; see the module docstring.

    ``ended(batch_ids)`` is called (on the event loop) with the batches whose work may have
    ended in a turn, so they can be checked for finalisation off this path.
    """

    def __init__(
        self,
        turn: Turn,
        executor: Executor | None,
        ended: Callable[[set[str]], None],
        max_chunks: int = 256,
        parallel: int = 1,
    ) -> None:
        self._turn = turn
        self._executor = executor
        self._ended = ended
        self._max_chunks = max_chunks
        self._parallel = parallel
        """Turns in flight at once: 1 for SQLite (its writes take turns anyway); a few for
        PostgreSQL, whose turns spend most of their time waiting on round trips."""
        self._in_flight: set[asyncio.Task[None]] = set()
        self._chunks: list[tuple[Chunk, Callable[[ResultAck], Awaitable[None]]]] = []
        self._round: tuple[Sequence[Ask], asyncio.Future[list[WorkGrant | None]]] | None = None
        self._wake = asyncio.Event()
        self.turns = 0
        self.chunks = 0
        self.asks = 0
        self.busy_s = 0.0
        """Time spent in turns (on the store thread), summed."""

    def submit_results(self, chunk: Chunk, answer: Callable[[ResultAck], Awaitable[None]]) -> None:
        """Queue a result chunk; ``answer(ack)`` is awaited after its turn."""
        self._chunks.append((chunk, answer))
        self._wake.set()

    async def lease(self, asks: Sequence[Ask]) -> list[WorkGrant | None]:
        """Lease units to ``asks`` in the next turn (one round at a time)."""
        if self._round is not None:
            raise RuntimeError("a dispatch round is already waiting for its turn")
        future: asyncio.Future[list[WorkGrant | None]] = asyncio.get_running_loop().create_future()
        self._round = (asks, future)
        self._wake.set()
        return await future

    @property
    def queued(self) -> int:
        return len(self._chunks)

    async def run(self) -> None:
        """Serve until cancelled."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (self._chunks or self._round is not None) and len(
                    self._in_flight
                ) < self._parallel:
                    taken = self._chunks[: self._max_chunks]
                    del self._chunks[: len(taken)]
                    round_, self._round = self._round, None
                    task = asyncio.ensure_future(self._take_turn(taken, round_))
                    self._in_flight.add(task)
                    task.add_done_callback(self._turn_done)
        finally:
            for task in self._in_flight:
                task.cancel()

    def _turn_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _take_turn(
        self,
        taken: list[tuple[Chunk, Callable[[ResultAck], Awaitable[None]]]],
        round_: tuple[Sequence[Ask], asyncio.Future[list[WorkGrant | None]]] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        chunks = [chunk for chunk, _ in taken]
        asks, future = round_ if round_ is not None else ((), None)
        started = time.perf_counter()
        try:
            acks, ended, grants = await loop.run_in_executor(
                self._executor, self._turn, chunks, asks
            )
        except Exception as exc:
            log.warning(
                "a store turn (%d results, %d asks) failed: %s", len(chunks), len(asks), exc
            )
            error = WireError(
                code="internal", message=f"the coordinator failed ({type(exc).__name__}); retry"
            )
            acks, ended = [ResultAck(error=error) for _ in chunks], set()
            grants = [WorkGrant(error=error) for _ in asks]
        self.busy_s += time.perf_counter() - started
        self.turns += 1
        self.chunks += len(chunks)
        self.asks += len(asks)
        if future is not None and not future.done():
            future.set_result(grants)
        if ended:
            self._ended(ended)
        for (_, answer), ack in zip(taken, acks, strict=True):
            try:
                await answer(ack)
            except Exception:  # one lost reply must not stop the others
                log.exception("answering a result chunk failed")
