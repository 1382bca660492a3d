"""Long-polled work requests: parked while there is nothing to do, leased in rounds.

A car with nothing to do asks for work and waits up to ``wait_s`` for an answer. Here such a
request costs an entry in a dict and a place on a 50 ms tick, never a task, a thread, a timer
or a store query: the dispatcher remembers, per kind of car (its models and its owner's
purposes and regions), that the store had nothing for that kind, and parks every request of
that kind without asking again until work is announced (a new batch, returned requests:
:meth:`Dispatcher.work_available`, which every replica hears over NATS) or ``recheck_s`` has
passed (in case an announcement was lost). Then ONE of that kind's requests goes to the store
as a probe; only if it gets work do the others follow (5,000 idle cars of a kind the new work
is not for cost one ask, not forty rounds). When there may be work, the dispatcher takes up to
``round_size`` waiting requests and leases units to all of them in ONE store transaction
(``lease``: the replica's next store turn), so a lease costs the same with 10 or 10,000 cars
waiting, and a crowd of cars asking at once shares one fsync. Requests that arrive meanwhile
queue for the next round.

Answers go out through each request's ``answer`` coroutine (the NATS edge publishes the reply).
A car that asks again while its earlier request waits (an agent restarted) gets its earlier
request answered empty at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

from idlefleet.protocol.messages import WireError, WorkGrant, WorkRequest

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

Answer = Callable[[WorkGrant], Awaitable[None]]
LeaseRound = Callable[[Sequence[tuple[str, WorkRequest]]], Awaitable[Sequence[WorkGrant | None]]]
KeyOf = Callable[[str, WorkRequest], Hashable]

NO_WORK_RETRY_S = 0.5
"""Retry hint for a car that asked without waiting and got nothing."""
POLL_JITTER = 0.2
"""Long polls end up to this fraction of their wait early, at random."""
ANSWER_SLICE = 256
"""Ended long polls answered before other messages get a turn."""
TICK_S = 0.05
"""Long polls end on ticks of this length (a timer per tick, not per parked request: with
thousands parked, a timer each cost a heap push and a Python comparison per heap level)."""


@dataclass(eq=False)
class _Ask:
    vehicle_id: str
    request: WorkRequest
    answer: Answer
    deadline: float
    key: Hashable
    tick: int | None = None
    """The expiry tick this ask waits in (None: none, or no longer)."""
    in_round: bool = False
    expired: bool = False
    replaced: bool = False


class Dispatcher:
    """See the module docstring. Use from one event loop; ``run`` serves until cancelled."""

    def __init__(
        self,
        lease: LeaseRound,
        key_of: KeyOf,
        round_size: int = 128,
        recheck_s: float = 2.0,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._lease = lease
        self._random = random
        self._key_of = key_of
        self.round_size = round_size
        self.recheck_s = recheck_s
        self._waiting: dict[Hashable, OrderedDict[str, _Ask]] = {}
        self._by_vehicle: dict[str, _Ask] = {}
        self._empty: dict[Hashable, tuple[int, float]] = {}
        """Kind -> (epoch, when) the store last had nothing for it. Current: park without
        asking; stale (a newer epoch, or older than ``recheck_s``): ask with one probe."""
        self._epoch = 0
        self._expired: list[_Ask] = []
        self._ticks: dict[int, list[_Ask]] = {}
        self._wake = asyncio.Event()
        self.rounds = 0
        self.leased = 0
        self.asked = 0
        self.busy_s = 0.0
        """Time spent leasing (worker thread), summed over rounds."""

    @property
    def parked(self) -> int:
        """Requests waiting for work now."""
        return len(self._by_vehicle)

    # -- called by the NATS edge ---------------------------------------------------------------
    def submit(self, vehicle_id: str, request: WorkRequest, answer: Answer) -> None:
        """Take a work request; ``answer`` is awaited with the grant (or an empty one)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        earlier = self._by_vehicle.get(vehicle_id)
        if earlier is not None:
            self._drop(earlier)
            earlier.replaced = True
            if not earlier.in_round:
                self._expired.append(earlier)
        # A long poll ends at a random moment in the last fifth of its wait: a crowd of cars
        # that asked together (after a reconnect, say) comes back spread out, not as a herd.
        wait_s = request.wait_s * (1.0 - POLL_JITTER * self._random())
        ask = _Ask(vehicle_id, request, answer, now + wait_s, self._key_of(vehicle_id, request))
        if request.wait_s <= 0 and self._known_empty(ask.key, now):
            self._expired.append(ask)  # asked without waiting, and there is nothing: say so
            self._wake.set()
            return
        self._by_vehicle[vehicle_id] = ask
        if request.wait_s > 0:
            self._arm(loop, ask)
        self._park(ask)
        if self._expired or not self._known_empty(ask.key, now):
            self._wake.set()

    def work_available(self) -> None:
        """Work may have entered the queue: what was found empty is stale, look again (with a
        probe per kind). Kinds with nobody waiting are forgotten."""
        self._epoch += 1
        self._empty = {key: found for key, found in self._empty.items() if key in self._waiting}
        self._wake.set()

    async def release_all(self) -> int:
        """Answer every parked request empty (a replica shutting down: the cars ask again, and
        another replica gets it). Returns how many were answered."""
        parked = [a for a in self._by_vehicle.values() if not a.in_round]
        for ask in parked:
            self._forget(ask)
            await self._send(ask, _empty_grant(ask))
        return len(parked)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.recheck_s)
            self._wake.clear()
            await self._answer_expired()
            while taken := self._take_round(loop.time()):
                epoch = self._epoch
                asks = [(a.vehicle_id, a.request) for a in taken]
                started = time.perf_counter()
                try:
                    grants = list(await self._lease(asks))
                except Exception as exc:
                    log.warning("a dispatch round of %d failed: %s", len(taken), exc)
                    grants = [_failed(exc)] * len(taken)
                self.busy_s += time.perf_counter() - started
                self.rounds += 1
                self.asked += len(taken)
                await self._settle(taken, grants, epoch, loop.time())
                await self._answer_expired()

    def _take_round(self, now: float) -> list[_Ask]:
        taken: list[_Ask] = []
        for key in list(self._waiting):
            if self._known_empty(key, now):
                continue
            queue = self._waiting[key]
            # Found empty before: one probe says whether that changed.
            limit = len(taken) + 1 if key in self._empty else self.round_size
            while queue and len(taken) < limit:
                _, ask = queue.popitem(last=False)
                ask.in_round = True
                taken.append(ask)
            if not queue:
                del self._waiting[key]
            if len(taken) >= self.round_size:
                break
        return taken

    async def _settle(
        self, taken: list[_Ask], grants: list[WorkGrant | None], epoch: int, now: float
    ) -> None:
        for ask, grant in zip(taken, grants, strict=True):
            ask.in_round = False
            if grant is None:
                # Nothing for this kind of car as of the round's start; a later announcement
                # (a newer epoch, maybe during the round) makes it worth a probe again.
                ask.key = self._key_of(ask.vehicle_id, ask.request)
                self._empty[ask.key] = (epoch, now)
                if ask.replaced:
                    await self._send(ask, _empty_grant(ask))
                elif ask.expired or ask.request.wait_s <= 0 or now >= ask.deadline:
                    self._forget(ask)
                    await self._send(ask, _empty_grant(ask))
                else:
                    self._park(ask)
                continue
            if grant.lease_id is not None:
                self.leased += 1
                self._empty.pop(ask.key, None)  # a probe found work: the rest of its kind next
            if not ask.replaced:
                self._forget(ask)
            await self._send(ask, grant)

    async def _answer_expired(self) -> None:
        while self._expired:
            expired, self._expired = self._expired[:ANSWER_SLICE], self._expired[ANSWER_SLICE:]
            for ask in expired:
                await self._send(ask, _empty_grant(ask))
            if self._expired:
                await asyncio.sleep(0)  # let other messages through between slices

    # -- bookkeeping ---------------------------------------------------------------------------
    def _arm(self, loop: asyncio.AbstractEventLoop, ask: _Ask) -> None:
        """End ``ask`` at the first tick after its deadline."""
        tick = math.ceil(ask.deadline / TICK_S)
        waiting = self._ticks.get(tick)
        if waiting is None:
            waiting = self._ticks[tick] = []
            loop.call_at(tick * TICK_S, self._tick, tick)
        waiting.append(ask)
        ask.tick = tick

    def _tick(self, tick: int) -> None:
        for ask in self._ticks.pop(tick, ()):
            if ask.tick == tick:  # else answered or replaced meanwhile
                self._timed_out(ask)

    def _timed_out(self, ask: _Ask) -> None:
        ask.tick = None
        ask.expired = True
        if ask.in_round or ask.replaced:
            return  # the round answers it
        self._forget(ask)
        self._expired.append(ask)
        self._wake.set()

    def _park(self, ask: _Ask) -> None:
        self._waiting.setdefault(ask.key, OrderedDict())[ask.vehicle_id] = ask

    def _drop(self, ask: _Ask) -> None:
        """Take ``ask`` out of the waiting queues and off its tick (not its answer)."""
        queue = self._waiting.get(ask.key)
        if queue is not None and queue.get(ask.vehicle_id) is ask:
            del queue[ask.vehicle_id]
            if not queue:
                del self._waiting[ask.key]
        ask.tick = None  # its tick passes it by

    def _forget(self, ask: _Ask) -> None:
        self._drop(ask)
        if self._by_vehicle.get(ask.vehicle_id) is ask:
            del self._by_vehicle[ask.vehicle_id]

    def _known_empty(self, key: Hashable, now: float) -> bool:
        found = self._empty.get(key)
        return found is not None and found[0] == self._epoch and now - found[1] < self.recheck_s

    @staticmethod
    async def _send(ask: _Ask, grant: WorkGrant) -> None:
        try:
            await ask.answer(grant)
        except Exception:  # a car that went away must not stop the others' answers
            log.exception("answering %s failed", ask.vehicle_id)


def _empty_grant(ask: _Ask) -> WorkGrant:
    # After a long poll the car may ask again at once; without one it should pause a little.
    return WorkGrant(retry_after_s=0.0 if ask.request.wait_s > 0 else NO_WORK_RETRY_S)


def _failed(exc: BaseException) -> WorkGrant:
    return WorkGrant(
        error=WireError(code="internal", message=f"the coordinator failed ({type(exc).__name__})")
    )
