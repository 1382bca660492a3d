"""Online requests: run one request on a live car now, following its progress, and move it to
another car — with the work done so far — when the car stops answering, is paused or fails.

The coordinator sends a :class:`RunRequest` to one car with a reply inbox of its own and reads
what comes back: partial replies (the request's progress in its workload's encoding, e.g. the
tokens so far: the car sends one every second, or after every step when the client streams)
and then one final reply (the result, or an error). Every progress is checked by the workload
(``check_progress``) and kept; a car that is silent for ``idle_timeout_s``, answers no-one is
listening (it disconnected), replies with an error (the driver is back: its last progress comes
with it) or sends something that fails a check loses the request, and the next car continues
from the progress kept (``RunRequest.progress_b64``). A streamed request's client sees a pause.

At most ``max_cars`` cars are tried per request, each for at most ``max_car_s`` (a car that
reports progress for ever, and never a result, loses the request too), so no request is retried
or held for ever; a client that goes away cancels the request here (the car finishes its run
into a closed inbox).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import nats
from nats.aio.client import Client

from idlefleet.coordinator.accounts import Accounts, Customer
from idlefleet.coordinator.errors import ServiceUnavailable
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import RunReply, RunRequest, pack
from idlefleet.protocol.subjects import Downlink
from idlefleet.workloads.base import Planned, Workload

__all__ = ["OnlineRouter", "Watch"]

log = logging.getLogger(__name__)


class Watch(Protocol):
    """Follows a request as it runs (a streamed response); raises ``ValueError`` if what the
    car sent cannot follow what it saw before (the car is refused, as for a failed check)."""

    def progress(self, data: bytes) -> None: ...

    def result(self, data: bytes, tokens: int) -> None: ...


class _CarFailed(Exception):
    """This car lost the request (why: the message; ``kind``: silent, slow, gone, stopped,
    refused)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class OnlineRouter:
    """Sends online requests to live vehicles, round-robin, failing over with their progress."""

    def __init__(
        self,
        nc: Client,
        work: WorkService,
        idle_timeout_s: float = 10.0,
        max_cars: int = 5,
        max_car_s: float = 900.0,
    ) -> None:
        self.nc = nc
        self.work = work
        self.idle_timeout_s = idle_timeout_s
        """Longest silence of a car running a request (it reports at least every second)."""
        self.max_cars = max_cars
        self.max_car_s = max_car_s
        """Longest one car may hold a request (a chat of 8,192 tokens at ~10 tokens/s fits);
        the next car goes on from its progress."""
        self.metrics: Metrics | None = None
        """Counts requests answered and refused, and their tokens (None: not counted)."""
        self.accounts: Accounts | None = None
        """Charges answered requests to their customers (None: not charged)."""
        self._charging: set[asyncio.Future[None]] = set()
        self._rr = itertools.count()
        self.moved: Counter[str] = Counter()
        """Requests that left a car before it finished them, by why (``/fleet/dispatch``)."""
        self.finished = 0
        """Requests finished."""

    async def run(
        self,
        workload: Workload,
        planned: Planned,
        watch: Watch | None = None,
        customer: Customer | None = None,
    ) -> tuple[bytes, int]:
        """Run ``planned`` on cars until one finishes it: its result, checked by the workload
        as a batch result is, and its tokens. ``watch`` sees every progress and the result;
        ``customer`` is charged for it (None: nobody is)."""
        model = planned.model
        # A paused car (driving, opted out, battery low) would only refuse: ask it never.
        candidates = self.work.online(model)
        if not candidates:
            self._count(workload, None)
            raise ServiceUnavailable(
                f"No vehicle serving model '{model}' is available right now; retry later.",
                code="no_capacity",
            )
        start = next(self._rr) % len(candidates)
        order = candidates[start:] + candidates[:start]
        tried: list[str] = []
        progress: list[bytes | None] = [None]
        problems: list[str] = []
        while len(tried) < self.max_cars:
            vehicle_id = next((v for v in order if v not in tried), None)
            if vehicle_id is None:
                # Every car known at the start was tried: any that joined or came back since?
                order = [v for v in self.work.online(model) if v not in tried]
                if not order:
                    break
                vehicle_id = order[0]
            tried.append(vehicle_id)
            try:
                done = await self._on_car(vehicle_id, workload, planned, progress, watch, customer)
            except _CarFailed as failed:
                self.moved[failed.kind] += 1
                problems.append(f"{vehicle_id}: {failed}")
                log.info("online request moves on from %s: %s", vehicle_id, failed)
                continue
            self.finished += 1
            self._count(workload, done)
            return done
        self._count(workload, None)
        raise ServiceUnavailable(
            "The fleet could not serve this request "
            f"({problems[-1] if problems else 'no vehicle answered'}); retry later.",
            code="no_capacity",
        )

    def _count(self, workload: Workload, done: tuple[bytes, int] | None) -> None:
        if self.metrics is None:
            return
        if done is None:
            self.metrics.finished(workload.kind, "online", 0, 1, 0, 0)
        else:
            self.metrics.finished(workload.kind, "online", 1, 0, *workload.usage(*done))

    async def _on_car(
        self,
        vehicle_id: str,
        workload: Workload,
        planned: Planned,
        progress: list[bytes | None],
        watch: Watch | None,
        customer: Customer | None,
    ) -> tuple[bytes, int]:
        """Run the request on one car from ``progress[0]`` (kept up to date as it reports)."""
        model = planned.model
        expected = workload.expectation(planned.payload)
        request = RunRequest(
            request_id=f"run_{uuid.uuid4().hex}",
            kind=workload.kind,
            model=model,
            payload=planned.payload,
            progress_b64=None if progress[0] is None else pack(progress[0]),
            stream=watch is not None,
        )
        inbox = subjects.reply_inbox(vehicle_id)  # the one namespace the car may answer on
        sub = await self.nc.subscribe(inbox)
        clock = asyncio.get_running_loop().time
        deadline = clock() + self.max_car_s
        try:
            await self.nc.publish(
                subjects.downlink(vehicle_id, Downlink.RUN), encode(request), reply=inbox
            )
            while True:
                left = deadline - clock()
                if left <= 0:
                    raise _CarFailed("slow", f"did not finish within {self.max_car_s:g} s")
                try:
                    msg = await sub.next_msg(timeout=min(self.idle_timeout_s, left))
                except nats.errors.TimeoutError:
                    if clock() >= deadline:
                        raise _CarFailed(
                            "slow", f"did not finish within {self.max_car_s:g} s"
                        ) from None
                    raise _CarFailed("silent", f"silent for {self.idle_timeout_s:g} s") from None
                if msg.headers and msg.headers.get("Status") == "503":
                    raise _CarFailed("gone", "not connected (no responders)")
                try:
                    reply = decode(RunReply, msg.data)
                    data = reply.progress() if reply.partial or reply.error else reply.data()
                except ValueError as exc:  # ProtocolError, or base64 that is not
                    raise self._refused(vehicle_id, str(exc)) from None
                if data and (reply.partial or reply.error is not None):
                    problem = workload.check_progress(model, [0], [expected], [len(data)], data)
                    if problem is None and watch is not None:
                        problem = _watched(watch.progress, data)
                    if problem is not None:
                        raise self._refused(vehicle_id, problem)
                    progress[0] = data
                if reply.partial:
                    continue
                if reply.error is not None:
                    raise _CarFailed("stopped", reply.error.message)
                problem = workload.check(
                    model, [0], [expected], [len(data)], [reply.token_count], data
                )
                if problem is None and watch is not None:
                    problem = _watched(
                        functools.partial(watch.result, tokens=reply.token_count), data
                    )
                if problem is not None:
                    raise self._refused(vehicle_id, problem)
                if customer is not None:
                    used = workload.usage(data, reply.token_count)
                    self._charge(request.request_id, customer, vehicle_id, model, used, reply)
                return data, reply.token_count
        finally:
            await sub.unsubscribe()

    def _charge(
        self,
        request_id: str,
        customer: Customer,
        vehicle_id: str,
        model: str,
        used: tuple[int, int],
        reply: RunReply,
    ) -> None:
        """Queue the answered request's charge (posted with the ledger's next flush): the
        customer's, for the car that finished it, at the energy that car metered for it."""
        if self.accounts is None:
            return
        task = asyncio.ensure_future(
            asyncio.to_thread(
                self.accounts.online_answered,
                request_id,
                customer.principal,
                vehicle_id,
                model,
                *used,
                reply.energy_j,
                customer.api_key_id,
            )
        )
        self._charging.add(task)
        task.add_done_callback(self._charged)

    def _charged(self, task: asyncio.Future[None]) -> None:
        self._charging.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an online request's charge was not queued: %s", task.exception())

    def snapshot(self) -> dict[str, object]:
        """Online requests finished and moved between cars (by why)."""
        return {"online_finished": self.finished, "online_moved": dict(self.moved)}

    def _refused(self, vehicle_id: str, problem: str) -> _CarFailed:
        self.work.refused_results[vehicle_id] += 1
        return _CarFailed("refused", f"refused: {problem}")


def _watched(see: Callable[[bytes], None], data: bytes) -> str | None:
    """What the watcher found wrong with ``data``, or None."""
    try:
        see(data)
    except ValueError as exc:
        return str(exc)
    return None
