"""Store turns: results and a dispatch round share one call; a failed turn answers everyone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from idlefleet.coordinator.turns import Ask, Chunk, StoreTurns
from idlefleet.protocol.messages import ResultAck, ResultChunk, WorkGrant, WorkRequest

REQUEST = WorkRequest(max_requests=1, models=["all-MiniLM-L6-v2"])


def chunk(i: int) -> Chunk:
    return (
        f"car-{i}",
        ResultChunk(
            lease_id=f"lease-{i}",
            seqs=[],
            token_counts=[],
            sizes=[],
            data_b64="",
        ),
    )


class Store:
    """Records each turn; the first turn waits on ``gate`` (a slow fsync)."""

    def __init__(self, fail: bool = False) -> None:
        self.turns: list[tuple[list[str], list[str]]] = []
        self.gate = threading.Event()
        self.fail = fail

    def turn(
        self, chunks: Sequence[Chunk], asks: Sequence[Ask]
    ) -> tuple[list[ResultAck], set[str], list[WorkGrant | None]]:
        self.turns.append(([c[1].lease_id for c in chunks], [a[0] for a in asks]))
        if len(self.turns) == 1:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("database restarting")
        acks = [ResultAck(committed=1) for _ in chunks]
        grants: list[WorkGrant | None] = [WorkGrant(lease_id=f"new-{a[0]}") for a in asks]
        return acks, {"batch-1"} if chunks else set(), grants


def test_results_and_a_round_that_queue_meanwhile_share_the_next_turn() -> None:
    store = Store()
    ended: list[set[str]] = []

    async def scenario() -> tuple[list[int], list[WorkGrant | None]]:
        turns = StoreTurns(store.turn, ThreadPoolExecutor(1), ended.append)
        runner = asyncio.create_task(turns.run())
        answered: list[int] = []

        def answer(i: int):  # type: ignore[no-untyped-def]
            async def done(ack: ResultAck) -> None:
                answered.append(i)

            return done

        turns.submit_results(chunk(0), answer(0))
        await asyncio.sleep(0.05)  # the first turn is now stuck in the store
        for i in range(1, 4):
            turns.submit_results(chunk(i), answer(i))
        round_ = asyncio.create_task(turns.lease([("car-9", REQUEST)]))
        await asyncio.sleep(0.05)
        store.gate.set()
        grants = await asyncio.wait_for(round_, 5)
        while len(answered) < 4:
            await asyncio.sleep(0.01)
        runner.cancel()
        return answered, grants

    answered, grants = asyncio.run(scenario())

    assert store.turns == [(["lease-0"], []), (["lease-1", "lease-2", "lease-3"], ["car-9"])]
    assert sorted(answered) == [0, 1, 2, 3]
    assert [g.lease_id for g in grants if g] == ["new-car-9"]
    assert ended == [{"batch-1"}, {"batch-1"}]


def test_a_failed_turn_answers_every_chunk_and_ask_with_an_error() -> None:
    store = Store(fail=True)
    store.gate.set()

    async def scenario() -> tuple[list[ResultAck], list[WorkGrant | None]]:
        turns = StoreTurns(store.turn, ThreadPoolExecutor(1), lambda ended: None)
        runner = asyncio.create_task(turns.run())
        acks: list[ResultAck] = []

        async def answer(ack: ResultAck) -> None:
            acks.append(ack)

        turns.submit_results(chunk(0), answer)
        grants = await asyncio.wait_for(turns.lease([("car-1", REQUEST)]), 5)
        while not acks:
            await asyncio.sleep(0.01)
        runner.cancel()
        return acks, grants

    acks, grants = asyncio.run(scenario())

    assert [a.error.code if a.error else None for a in acks] == ["internal"]
    assert [g.error.code if g and g.error else None for g in grants] == ["internal"]


def test_no_more_turns_run_at_once_than_allowed() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def turn(
        chunks: Sequence[Chunk], asks: Sequence[Ask]
    ) -> tuple[list[ResultAck], set[str], list[WorkGrant | None]]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.02)
        with lock:
            running -= 1
        return [ResultAck() for _ in chunks], set(), [None for _ in asks]

    async def scenario() -> int:
        turns = StoreTurns(
            turn, ThreadPoolExecutor(4), lambda ended: None, max_chunks=1, parallel=2
        )
        runner = asyncio.create_task(turns.run())
        done: list[ResultAck] = []

        async def answer(ack: ResultAck) -> None:
            done.append(ack)

        for i in range(8):
            turns.submit_results(chunk(i), answer)
        while len(done) < 8:
            await asyncio.sleep(0.01)
        runner.cancel()
        return len(done)

    assert asyncio.run(scenario()) == 8
    assert most == 2
