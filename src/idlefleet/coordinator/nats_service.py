"""The coordinator's NATS edge: uplink subscriptions, dispatch, online requests, policy pushes.

One subscription per uplink verb (all replicas in one queue group), so a slow kind of message
never queues another kind behind it. Every message is admitted in the same order: its subject
names a valid car id, the car is within its message budget (:mod:`ratelimit`), the payload
decodes into exactly the expected message (:func:`idlefleet.protocol.codec.decode`); a message
that fails any step is answered with an error that says why, counted (:class:`EdgeStats`), and
changes nothing. Then, by verb:

* heartbeat: answered from memory (:meth:`WorkService.heartbeat_cached`), in the callback;
  the first message of a car this replica has not seen waits for a store read, shared with
  every other such car that queued meanwhile (:meth:`WorkService.look_up_many`).
* work: handed to the :class:`~idlefleet.coordinator.dispatch.Dispatcher` (parked, or leased
  in a round in the next store turn); the callback returns at once.
* results: queued for the next store turn (:class:`~idlefleet.coordinator.turns.StoreTurns`),
  which commits every chunk that arrived meanwhile and leases the dispatcher's round in one
  transaction; register: queued for a :class:`~idlefleet.coordinator.batching.BatchRunner`.
* release, policy: rare; each runs in a worker thread.

Nothing a car sends can make the coordinator block its event loop or retry for ever: store
work happens in threads, slow paths are bounded (``max_slow``) and refused beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from idlefleet.coordinator.batching import BatchRunner
from idlefleet.coordinator.dispatch import Dispatcher
from idlefleet.coordinator.ratelimit import RateLimit, TokenBuckets
from idlefleet.coordinator.turns import StoreTurns
from idlefleet.coordinator.work import WorkService
from idlefleet.models.catalog import MODELS
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    Ack,
    Heartbeat,
    Progress,
    RegisterReply,
    RegisterRequest,
    Release,
    ResultChunk,
    WireError,
    WireModel,
    WorkGrant,
    WorkRequest,
)
from idlefleet.protocol.policy import PolicyRequest, PolicyUpdate
from idlefleet.protocol.subjects import Downlink, Uplink

log = logging.getLogger(__name__)

POLICY_PUSH_TIMEOUT_S = 1.0
"""How long a policy push waits for the car's answer; a car that misses it catches up through
the policy version in its next heartbeat's ack."""

M = TypeVar("M", bound=WireModel)


@dataclass(frozen=True)
class EdgeLimits:
    """What one car may send, and how much slow-path work may be in flight."""

    per_car: RateLimit = field(default_factory=RateLimit)
    max_slow: int = 256
    """Releases and policy fetches in flight (each a task and a store call)."""
    round_size: int = 128
    """Work requests leased in one store transaction."""
    recheck_s: float = 2.0
    """How long a kind of car found without work is parked without asking the store again."""
    store_threads: int = 1
    """Threads for the hot store calls (dispatch rounds, result and registration batches).
    One suits SQLite, whose writes take turns anyway, and saves the threads from fighting over
    the GIL; PostgreSQL overlaps its round trips with a few."""
    own_inbox_only: bool = False
    """Answer a car only in its own inbox (``_INBOX.<car>.``): with car identities on, the
    reply subject is the one part of a car's message its permissions do not confine, and the
    coordinators may publish anywhere, so a reply elsewhere would let a car make a coordinator
    publish on another car's subjects or the JetStream API. Others are dropped, counted
    ``bad_reply``."""


YIELD_EVERY = 32
"""Messages the edge handles before it lets other tasks of the event loop run."""


class EdgeStats:
    """Counters of what this replica's edge received and refused (``/fleet/dispatch``)."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def as_dict(self) -> dict[str, Any]:
        return {"received": dict(self.received), "refused": dict(self.refused)}


class CoordinatorNats:
    """Serves the work protocol for one coordinator replica."""

    def __init__(
        self,
        nc: Client,
        work: WorkService,
        limits: EdgeLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.work = work
        self.limits = limits or EdgeLimits()
        self.clock = clock
        self.stats = EdgeStats()
        self._buckets = TokenBuckets(self.limits.per_car)
        self._slow = 0
        self._since_yield = 0
        self._store_thread = ThreadPoolExecutor(
            self.limits.store_threads, thread_name_prefix="store"
        )
        self.turns = StoreTurns(
            work.turn, self._store_thread, self.finalize_soon, parallel=self.limits.store_threads
        )
        self.dispatcher = Dispatcher(
            self.turns.lease,
            self._kind_of,
            round_size=self.limits.round_size,
            recheck_s=self.limits.recheck_s,
        )
        # Cars this replica has not heard from yet (a replica that just started hears from
        # thousands at once) are looked up together, one store read for all that queued.
        self.lookups = BatchRunner[str, bool](
            "lookup", work.look_up_many, lambda _, exc: False, max_batch=1000
        )
        self.registrations = BatchRunner[tuple[str, RegisterRequest], RegisterReply](
            "register",
            work.register_many,
            lambda _, exc: RegisterReply(
                accepted=False, error=WireError(code="internal", message=_failure(exc))
            ),
            executor=self._store_thread,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscriptions: list[Subscription] = []
        self._finalizing: set[str] = set()
        self.on_work_returned: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        handlers: dict[Uplink, Callable[[Msg], Awaitable[None]]] = {
            Uplink.REGISTER: self._on_register,
            Uplink.HEARTBEAT: self._on_heartbeat,
            Uplink.WORK: self._on_work,
            Uplink.RESULTS: self._on_results,
            Uplink.RELEASE: self._on_release,
            Uplink.PROGRESS: self._on_progress,
            Uplink.POLICY: self._on_policy,
        }
        for verb, handler in handlers.items():
            self._subscriptions.append(
                await self.nc.subscribe(
                    subjects.uplink_wildcard(verb), queue=subjects.COORDINATOR_QUEUE, cb=handler
                )
            )
        await self.nc.subscribe(subjects.WORK_AVAILABLE, cb=self._on_work_available)
        for runner in (self.dispatcher, self.turns, self.registrations, self.lookups):
            self._spawn(runner.run())

    async def stop(self) -> None:
        """Answer the parked work requests (their cars ask again, at another replica), then
        stop the edge's tasks and its store thread."""
        for subscription in self._subscriptions:  # new messages go to the other replicas
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        await self.dispatcher.release_all()
        with contextlib.suppress(nats.errors.Error):
            await self.nc.flush(timeout=2)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._store_thread.shutdown(wait=True, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        """What the edge is doing now, for operators."""
        return {
            **self.stats.as_dict(),
            "parked_work_requests": self.dispatcher.parked,
            "dispatch_rounds": self.dispatcher.rounds,
            "dispatch_asks": self.dispatcher.asked,
            "leases": self.dispatcher.leased,
            "store_turns": self.turns.turns,
            "store_turn_busy_s": round(self.turns.busy_s, 3),
            "result_chunks": self.turns.chunks,
            "registrations": self.registrations.items,
            "lookups": self.lookups.items,
            "cars_known": len(self.work.registry),
            "progress_recorded": self.work.progress_recorded,
            "resumed_with_progress": self.work.resumed,
            "slow_in_flight": self._slow,
        }

    def forget_idle_budgets(self) -> None:
        self._buckets.forget_idle(self.clock())

    # -- announcements -------------------------------------------------------------------------
    async def announce_work(self) -> None:
        """Tell every replica (and so every long-polling car) that work entered the queue."""
        try:
            await self.nc.publish(subjects.WORK_AVAILABLE, b"")
        except nats.errors.Error as exc:  # the replicas' recheck covers a lost announcement
            log.warning("announcing work failed: %s", exc)

    async def _on_work_available(self, _msg: Msg) -> None:
        self.dispatcher.work_available()

    def work_returned(self) -> None:
        """Thread-safe: requests went back to the queue, wake the long polls of every replica."""
        self._loop.call_soon_threadsafe(lambda: self._spawn(self.announce_work()))

    # -- admission -----------------------------------------------------------------------------
    async def _admit(self, msg: Msg, verb: Uplink, kind: type[M]) -> tuple[str, M] | None:
        """The car and its message, or None after answering why not."""
        self.stats.received[verb.value] += 1
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            # A subscription drains its whole backlog without giving up the event loop when
            # no handler has to wait (a burst of 2,000 messages held it ~200 ms): let the
            # rest of the edge (answers of store turns, other verbs) have a turn.
            self._since_yield = 0
            await asyncio.sleep(0)
        try:
            vehicle_id, _ = subjects.parse_uplink(msg.subject)
        except ValueError as exc:
            await self._refuse(msg, "bad_subject", str(exc))
            return None
        if not self._buckets.allow(vehicle_id, self.clock()):
            await self._refuse(
                msg,
                "rate_limited",
                f"vehicle {vehicle_id} sends more than {self.limits.per_car.per_second:g} "
                "messages/s; slow down",
            )
            return None
        try:
            return vehicle_id, decode(kind, msg.data)
        except ProtocolError as exc:
            await self._refuse(msg, "bad_message", str(exc))
            return None

    async def _refuse(self, msg: Msg, code: str, message: str) -> None:
        self.stats.refused[code] += 1
        if msg.reply:
            await self._reply(msg, _error_bytes(code, message))

    def _slow_path(self, msg: Msg, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` as a task, unless too many already run (then refuse: overloaded)."""
        if self._slow >= self.limits.max_slow:
            self._spawn(self._refuse(msg, "overloaded", "the coordinator is busy; retry"))
            return

        async def bounded() -> None:
            self._slow += 1
            try:
                await work()
            except Exception as exc:
                log.exception("handling %s failed", msg.subject)
                await self._refuse(msg, "internal", _failure(exc))
            finally:
                self._slow -= 1

        self._spawn(bounded())

    # -- handlers ------------------------------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.HEARTBEAT, Heartbeat)
        if admitted is None:
            return
        vehicle_id, beat = admitted
        ack = self.work.heartbeat_cached(vehicle_id, beat)
        if ack is not None:
            await self._answer(msg, ack)
            return

        async def looked_up(registered: bool) -> None:
            known = self.work.heartbeat_cached(vehicle_id, beat) if registered else None
            await self._answer(msg, known or Ack(ok=False, error=_not_registered(vehicle_id)))

        self.lookups.submit(vehicle_id, looked_up)

    async def _on_work(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.WORK, WorkRequest)
        if admitted is None:
            return
        vehicle_id, request = admitted

        async def answer(grant: WorkGrant) -> None:
            if grant.error is not None:
                self.stats.refused[grant.error.code] += 1
            await self._answer(msg, grant)

        async def looked_up(registered: bool) -> None:
            if registered:
                self.dispatcher.submit(vehicle_id, request, answer)
            else:
                await answer(WorkGrant(error=_not_registered(vehicle_id)))

        registered = self.work.known_state(vehicle_id)
        if registered is None:
            self.lookups.submit(vehicle_id, looked_up)
        else:
            await looked_up(registered)

    async def _on_results(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.RESULTS, ResultChunk)
        if admitted is None:
            return
        self.turns.submit_results(admitted, self._answerer(msg))
        if admitted[1].failed_seqs:
            self._spawn(self.announce_work())  # they go back to the queue in the turn

    async def _on_register(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.REGISTER, RegisterRequest)
        if admitted is not None:
            self.registrations.submit(admitted, self._answerer(msg))

    async def _on_release(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.RELEASE, Release)
        if admitted is None:
            return
        vehicle_id, release = admitted

        async def slow() -> None:
            ack = await asyncio.to_thread(self.work.release, vehicle_id, release)
            await self._answer(msg, ack)
            if ack.released:
                await self.announce_work()

        self._slow_path(msg, slow)

    async def _on_progress(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.PROGRESS, Progress)
        if admitted is None:
            return
        vehicle_id, report = admitted

        async def slow() -> None:
            await self._answer(msg, await asyncio.to_thread(self.work.progress, vehicle_id, report))

        self._slow_path(msg, slow)

    async def _on_policy(self, msg: Msg) -> None:
        admitted = await self._admit(msg, Uplink.POLICY, PolicyRequest)
        if admitted is None:
            return
        vehicle_id, request = admitted

        async def slow() -> None:
            await self._answer(msg, await asyncio.to_thread(self.work.policy, vehicle_id, request))

        self._slow_path(msg, slow)

    # -- helpers -------------------------------------------------------------------------------
    def _kind_of(self, vehicle_id: str, request: WorkRequest) -> Hashable:
        """Cars of one kind get the same answer from the store: same models, same consent."""
        known = self.work.owners.cached(vehicle_id)
        if known is None or not known.policy.opted_in:
            return ("car", vehicle_id)  # unknown or refused: never grouped, always asked
        policy = known.policy
        models = tuple(sorted(m for m in request.models if m in MODELS))
        return (models, tuple(sorted(policy.purposes)), tuple(sorted(policy.data_regions)))

    def finalize_soon(self, batch_ids: set[str]) -> None:
        """Check these batches for their end, each once at a time, in worker threads."""
        for batch_id in batch_ids - self._finalizing:
            self._finalizing.add(batch_id)

            async def check(batch_id: str = batch_id) -> None:
                try:
                    await asyncio.to_thread(self.work.batches.maybe_finalize, batch_id)
                except Exception:  # the sweeper retries every second
                    log.exception("finalising %s failed", batch_id)
                finally:
                    self._finalizing.discard(batch_id)

            self._spawn(check())

    def _answerer(self, msg: Msg) -> Callable[[Any], Awaitable[None]]:
        async def answer(reply: WireModel) -> None:
            await self._answer(msg, reply)

        return answer

    async def _answer(self, msg: Msg, reply: WireModel) -> None:
        if msg.reply:
            await self._reply(msg, encode(reply))

    async def _reply(self, msg: Msg, data: bytes) -> None:
        if self.limits.own_inbox_only and not _own_inbox(msg.subject, msg.reply):
            self.stats.refused["bad_reply"] += 1
            return
        try:
            await msg.respond(data)
        except nats.errors.Error as exc:  # the car retries; nothing here can do better
            log.info("reply on %s lost: %s", msg.subject, exc)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- downlink ------------------------------------------------------------------------------
    async def push_policy(self, vehicle_id: str, update: PolicyUpdate) -> bool:
        """Send the car its owner's new policy at once; True if the car acknowledged it.

        Best effort by design: an offline car, a car that does not answer within
        :data:`POLICY_PUSH_TIMEOUT_S`, or a lost NATS connection is logged and left to the
        heartbeat, whose ack carries the current version (the car then asks on uplink
        ``policy``). The owner's change is already stored when this runs.
        """
        if not self.nc.is_connected:
            log.info("policy %d for %s not pushed: NATS not connected", update.version, vehicle_id)
            return False
        try:
            raw = await request_car(
                self.nc,
                subjects.downlink(vehicle_id, Downlink.POLICY),
                subjects.reply_inbox(vehicle_id),
                encode(update),
                POLICY_PUSH_TIMEOUT_S,
            )
            ack = decode(Ack, raw.data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            log.info("policy %d for %s not pushed: %s", update.version, vehicle_id, exc)
            return False
        except (ProtocolError, nats.errors.Error) as exc:
            log.warning("policy %d for %s: bad answer: %s", update.version, vehicle_id, exc)
            return False
        if not ack.ok:
            log.warning("car %s refused policy %d: %s", vehicle_id, update.version, ack.error)
        return ack.ok


def _own_inbox(subject: str, reply: str) -> bool:
    """Whether ``reply`` is in the inbox of the car whose uplink ``subject`` is."""
    parts = subject.split(".", 4)
    if len(parts) < 4 or parts[0] + "." + parts[1] + "." + parts[2] != f"{subjects.PREFIX}.uplink":
        return False
    return reply.startswith(f"_INBOX.{parts[3]}.") and len(reply) > len(parts[3]) + 8


async def request_car(nc: Client, subject: str, inbox: str, payload: bytes, timeout: float) -> Msg:
    """``nc.request`` with the reply subject ``inbox`` (in the car's reply namespace, which its
    credentials let it publish to) instead of this connection's shared inbox."""
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, payload, reply=inbox)
        msg = await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    if msg.headers and msg.headers.get("Status") == "503":
        raise nats.errors.NoRespondersError
    return msg


def _failure(exc: BaseException) -> str:
    return f"the coordinator failed ({type(exc).__name__}); retry"


def _error(reply_type: type[M], code: str, message: str) -> M:
    return reply_type.model_validate({"error": WireError(code=code, message=message[:2000])})


def _error_bytes(code: str, message: str) -> bytes:
    # Every reply type has an optional ``error`` but PolicyUpdate, whose version and policy are
    # required; ``{"error": …}`` alone is therefore a valid error reply to any request, and a
    # car cannot mistake it for a policy.
    error = WireError(code=code, message=message[:2000])
    return b'{"error":' + error.model_dump_json().encode() + b"}"


def _not_registered(vehicle_id: str) -> WireError:
    return WireError(code="not_registered", message=f"vehicle {vehicle_id} must register first")
