"""The coordinator's NATS edge: uplink subscriptions, long-polled work, online requests.

Decodes every message from a vehicle with :func:`idlefleet.protocol.codec.decode` (untrusted
input: a bad message gets an error reply and changes nothing), runs the matching
:class:`~idlefleet.coordinator.work.WorkService` method in a worker thread (the store blocks),
and replies. Replicas share the uplink subjects through one queue group. It also pushes a
changed owner policy to its car (:meth:`CoordinatorNats.push_policy`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from idlefleet.coordinator.errors import ServiceUnavailable
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    Ack,
    EmbedReply,
    EmbedRequest,
    Heartbeat,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    WireError,
    WireModel,
    WorkGrant,
    WorkRequest,
)
from idlefleet.protocol.policy import PolicyRequest, PolicyUpdate
from idlefleet.protocol.subjects import Downlink, Uplink

log = logging.getLogger(__name__)

_MAX_CONCURRENT = 64
POLICY_PUSH_TIMEOUT_S = 1.0
"""How long a policy push waits for the car's answer; a car that misses it catches up through
the policy version in its next heartbeat's ack."""


class CoordinatorNats:
    """Serves the work protocol for one coordinator replica."""

    def __init__(self, nc: Client, work: WorkService) -> None:
        self.nc = nc
        self.work = work
        self._work_available = asyncio.Event()
        self._slots = asyncio.Semaphore(_MAX_CONCURRENT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes: dict[Uplink, tuple[type[WireModel], type[WireModel], Callable[..., Any]]] = {
            Uplink.REGISTER: (RegisterRequest, RegisterReply, work.register),
            Uplink.HEARTBEAT: (Heartbeat, Ack, work.heartbeat),
            Uplink.WORK: (WorkRequest, WorkGrant, work.work),
            Uplink.RESULTS: (ResultChunk, ResultAck, work.results),
            Uplink.RELEASE: (Release, ReleaseAck, self._release),
            Uplink.POLICY: (PolicyRequest, PolicyUpdate, work.policy),
        }

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for verb in self._routes:
            await self.nc.subscribe(
                subjects.uplink_wildcard(verb), queue=subjects.COORDINATOR_QUEUE, cb=self._spawn
            )
        await self.nc.subscribe(subjects.WORK_AVAILABLE, cb=self._on_work_available)

    async def announce_work(self) -> None:
        """Tell every replica (and so every long-polling vehicle) that work entered the queue."""
        await self.nc.publish(subjects.WORK_AVAILABLE, b"")

    async def _on_work_available(self, _msg: Msg) -> None:
        self._work_available.set()

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
            raw = await self.nc.request(
                subjects.downlink(vehicle_id, Downlink.POLICY),
                encode(update),
                timeout=POLICY_PUSH_TIMEOUT_S,
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

    def work_returned(self) -> None:
        """Thread-safe: requests went back to the queue, wake the long polls of every replica."""
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.announce_work()))

    def _release(self, vehicle_id: str, msg: Release) -> ReleaseAck:
        ack = self.work.release(vehicle_id, msg)
        if ack.released:
            self.work_returned()
        return ack

    async def _spawn(self, msg: Msg) -> None:
        # One task per message, so a long-polled work request does not hold up the others.
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        async with self._slots:
            try:
                vehicle_id, verb = subjects.parse_uplink(msg.subject)
            except ValueError:
                return  # a subject outside the protocol: nothing to answer to
            request_type, reply_type, handler = self._routes[verb]
            reply: WireModel | bytes
            try:
                request = decode(request_type, msg.data)
                if isinstance(request, WorkRequest):
                    reply = await self._long_poll(vehicle_id, request)
                else:
                    reply = await asyncio.to_thread(handler, vehicle_id, request)
            except ProtocolError as exc:
                reply = _error_reply(reply_type, "bad_message", str(exc))
            except Exception:
                log.exception("%s from %s failed", verb.value, vehicle_id)
                reply = _error_reply(reply_type, "internal", "the coordinator failed; retry")
            if msg.reply:
                await msg.respond(reply if isinstance(reply, bytes) else encode(reply))

    async def _long_poll(self, vehicle_id: str, request: WorkRequest) -> WorkGrant:
        deadline = time.monotonic() + request.wait_s
        while True:
            self._work_available.clear()
            grant = await asyncio.to_thread(self.work.work, vehicle_id, request)
            remaining = deadline - time.monotonic()
            if grant.lease_id is not None or grant.error is not None or remaining <= 0:
                return grant
            try:
                await asyncio.wait_for(self._work_available.wait(), timeout=remaining)
            except TimeoutError:
                return await asyncio.to_thread(self.work.work, vehicle_id, request)


def _error_reply(reply_type: type[WireModel], code: str, message: str) -> WireModel | bytes:
    error = WireError(code=code, message=message[:2000])
    if "error" in reply_type.model_fields:
        return reply_type.model_validate({"error": error})
    # PolicyUpdate has no ``error`` field (its version and policy are required), so the error
    # goes out in the same ``{"error": ...}`` shape; the car cannot mistake it for a policy.
    return b'{"error":' + error.model_dump_json().encode() + b"}"


class OnlineRouter:
    """Sends online embedding requests to live vehicles, round-robin, failing over."""

    def __init__(self, nc: Client, work: WorkService, timeout_s: float = 30.0) -> None:
        self.nc = nc
        self.work = work
        self.timeout_s = timeout_s
        self._rr = itertools.count()

    async def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        vehicles = await asyncio.to_thread(self.work.active_vehicles)
        # A paused car (driving, opted out, battery low) would only refuse: ask it never.
        candidates = [v.id for v in vehicles if model in v.models and v.status != "paused"]
        if not candidates:
            raise ServiceUnavailable(
                f"No vehicle serving model '{model}' is available right now; retry later.",
                code="no_capacity",
            )
        start = next(self._rr) % len(candidates)
        order = candidates[start:] + candidates[:start]
        request = EmbedRequest(request_id=f"emb_{uuid.uuid4().hex}", model=model, texts=texts)
        last_problem = "no vehicle answered"
        for vehicle_id in order[:3]:
            try:
                raw = await self.nc.request(
                    subjects.downlink(vehicle_id, Downlink.EMBED),
                    encode(request),
                    timeout=self.timeout_s,
                )
                reply = decode(EmbedReply, raw.data)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                last_problem = f"{vehicle_id}: {type(exc).__name__}"
                continue
            except ProtocolError as exc:
                last_problem = f"{vehicle_id}: {exc}"
                continue
            if reply.error is not None:
                last_problem = f"{vehicle_id}: {reply.error.message}"
                continue
            vectors = reply.vectors()
            if vectors.shape[0] != len(texts) or len(reply.token_counts) != len(texts):
                last_problem = f"{vehicle_id}: wrong number of vectors"
                continue
            return vectors, list(reply.token_counts)
        raise ServiceUnavailable(
            f"The fleet could not serve this request ({last_problem}); retry later.",
            code="no_capacity",
        )
