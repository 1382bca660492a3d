"""The vehicle agent's main loop: register, heartbeat, lease units, run the model, report.

The agent keeps one outbound NATS connection (it never listens on a port). A fetcher task keeps
one leased unit in hand ahead of the one running, so the model never waits on the network; the
runner embeds a unit in chunks, sending each chunk's results at once (which commits them and
extends the lease) while the next chunk computes. On shutdown the agent releases what it holds,
so the coordinator re-queues it at once instead of waiting for the lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import nats
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from idlefleet import __version__
from idlefleet.agent.config import AgentConfig
from idlefleet.agent.runtime import Embedder
from idlefleet.models.catalog import MINILM
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
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
    WorkItem,
    WorkRequest,
    pack_vectors,
)
from idlefleet.protocol.subjects import Downlink, Uplink

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0


class VehicleAgent:
    def __init__(self, config: AgentConfig, embedder: Embedder) -> None:
        self.config = config
        self.embedder = embedder
        self.nc: Client | None = None
        self.heartbeat_interval_s = 5.0
        self._status: Literal["idle", "working", "paused"] = "idle"
        self._held: set[str] = set()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._online = ThreadPoolExecutor(1, thread_name_prefix="online")
        self._registered = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    # -- wire helpers --------------------------------------------------------------------------
    async def _call(
        self, verb: Uplink, message: WireModel, reply_type: type, timeout: float = REQUEST_TIMEOUT_S
    ) -> WireModel:
        assert self.nc is not None
        raw = await self.nc.request(
            subjects.uplink(self.config.vehicle_id, verb), encode(message), timeout=timeout
        )
        return decode(reply_type, raw.data)

    async def register(self) -> None:
        request = RegisterRequest(
            protocol_version=PROTOCOL_VERSION,
            agent_version=__version__,
            hardware=self.config.hardware,
            models=[MINILM.id],
        )
        while True:
            try:
                reply = await self._call(Uplink.REGISTER, request, RegisterReply)
            except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
                log.warning("registration failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            assert isinstance(reply, RegisterReply)
            if not reply.accepted:
                raise RuntimeError(f"coordinator refused registration: {reply.error}")
            self.heartbeat_interval_s = reply.heartbeat_interval_s
            self._registered.set()
            log.info("%s registered", self.config.vehicle_id)
            return

    # -- main ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then release held leases and disconnect."""

        async def on_reconnect() -> None:
            # Re-register on every reconnect: the coordinator may have restarted meanwhile.
            # Not awaited here: the client runs this callback inside its reconnect logic.
            self._registered.clear()
            task = asyncio.create_task(self.register())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self.nc = await nats.connect(
            self.config.nats_url,
            name=f"idlefleet-agent-{self.config.vehicle_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            reconnected_cb=on_reconnect,
        )
        await self.nc.subscribe(
            subjects.downlink(self.config.vehicle_id, Downlink.EMBED), cb=self._on_embed
        )
        await self.register()
        units: asyncio.Queue[WorkGrant] = asyncio.Queue(maxsize=1 if self.config.prefetch else 0)
        tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._fetch_units(units)),
            asyncio.create_task(self._run_units(units)),
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        while not units.empty():
            self._held.add(units.get_nowait().lease_id or "")
        await self._release_all("shutdown")
        with contextlib.suppress(Exception):
            await self.nc.drain()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._online.shutdown(wait=False, cancel_futures=True)

    async def _release_all(self, reason: str) -> None:
        for lease_id in list(self._held):
            await self._release(lease_id, reason)

    async def _release(self, lease_id: str, reason: str) -> None:
        """Give a lease back at once, so its unfinished requests need not wait for expiry."""
        if lease_id:
            with contextlib.suppress(Exception):
                await self._call(
                    Uplink.RELEASE, Release(lease_id=lease_id, reason=reason[:200]), ReleaseAck, 2.0
                )
        self._held.discard(lease_id)

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            seq += 1
            beat = Heartbeat(seq=seq, status=self._status, active_leases=sorted(self._held)[:16])
            try:
                ack = await self._call(Uplink.HEARTBEAT, beat, Ack)
            except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            assert isinstance(ack, Ack)
            if ack.error is not None and ack.error.code == "not_registered":
                await self.register()

    async def _fetch_units(self, units: asyncio.Queue[WorkGrant]) -> None:
        request = WorkRequest(
            max_requests=self.config.max_unit_requests,
            models=[MINILM.id],
            wait_s=self.config.long_poll_s,
        )
        while True:
            await self._registered.wait()
            try:
                grant = await self._call(
                    Uplink.WORK, request, WorkGrant, timeout=self.config.long_poll_s + 10
                )
            except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
                log.warning("work request failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            assert isinstance(grant, WorkGrant)
            if grant.error is not None:
                log.warning("work refused: %s", grant.error.message)
                if grant.error.code == "not_registered":
                    self._registered.clear()
                    await self.register()
                else:
                    await asyncio.sleep(1.0)
                continue
            if grant.lease_id is None:
                await asyncio.sleep(grant.retry_after_s if request.wait_s == 0 else 0)
                continue
            self._held.add(grant.lease_id)
            await units.put(grant)

    async def _run_units(self, units: asyncio.Queue[WorkGrant]) -> None:
        while True:
            grant = await units.get()
            self._status = "working"
            try:
                await self._run_unit(grant)
            except Exception as exc:  # one bad unit must not end the agent's work loop
                log.exception("unit %s failed; releasing it", grant.lease_id)
                await self._release(grant.lease_id or "", f"error: {type(exc).__name__}")
            finally:
                self._held.discard(grant.lease_id or "")
                self._status = "idle" if units.empty() else "working"

    async def _run_unit(self, grant: WorkGrant) -> None:
        assert grant.lease_id is not None
        loop = asyncio.get_running_loop()
        sends: list[asyncio.Task[bool]] = []
        step = self.config.chunk_requests
        # Similar token lengths in one chunk pad least. The coordinator leases by character
        # length; tokens are what the model pads, and counting them costs ~1% of the run.
        tokens = await loop.run_in_executor(
            self._compute, self.embedder.count_tokens, [" ".join(i.texts) for i in grant.items]
        )
        items = [i for _, i in sorted(zip(tokens, grant.items, strict=True), key=lambda p: p[0])]
        for start in range(0, len(items), step):
            if sends and sends[-1].done() and not sends[-1].result():
                break  # the lease is gone: the coordinator re-queued the rest
            chunk = items[start : start + step]
            texts = [t for item in chunk for t in item.texts]
            result = await loop.run_in_executor(self._compute, self.embedder.embed, texts)
            sends.append(
                asyncio.create_task(
                    self._send(grant.lease_id, chunk, result.vectors, result.token_counts)
                )
            )
        await asyncio.gather(*sends, return_exceptions=True)

    async def _send(
        self, lease_id: str, chunk: list[WorkItem], vectors: np.ndarray, tokens: list[int]
    ) -> bool:
        """Send one chunk's results; True while the lease is still active."""
        per_request_tokens = []
        row = 0
        for item in chunk:
            per_request_tokens.append(sum(tokens[row : row + len(item.texts)]))
            row += len(item.texts)
        message = ResultChunk(
            lease_id=lease_id,
            seqs=[item.seq for item in chunk],
            text_counts=[len(item.texts) for item in chunk],
            token_counts=per_request_tokens,
            dim=int(vectors.shape[1]),
            vectors_b64=pack_vectors(vectors),
        )
        for attempt in range(3):
            try:
                ack = await self._call(Uplink.RESULTS, message, ResultAck)
            except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
                log.warning("sending results failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            assert isinstance(ack, ResultAck)
            if ack.error is not None:
                log.warning("results refused: %s", ack.error.message)
                return False
            return ack.lease_active
        return False

    # -- online requests -----------------------------------------------------------------------
    async def _on_embed(self, msg: Msg) -> None:
        try:
            request = decode(EmbedRequest, msg.data)
        except ProtocolError as exc:
            await msg.respond(
                encode(EmbedReply(error=WireError(code="bad_message", message=str(exc))))
            )
            return
        if request.model != MINILM.id:
            reply = EmbedReply(
                error=WireError(code="unknown_model", message=f"model {request.model} not here")
            )
        else:
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(
                    self._online, self.embedder.embed, request.texts
                )
                reply = EmbedReply(
                    dim=int(result.vectors.shape[1]),
                    vectors_b64=pack_vectors(result.vectors),
                    token_counts=result.token_counts,
                )
            except Exception as exc:  # the car answers with an error rather than silence
                log.exception("online embedding failed")
                reply = EmbedReply(error=WireError(code="inference_failed", message=str(exc)[:500]))
        await msg.respond(encode(reply))
