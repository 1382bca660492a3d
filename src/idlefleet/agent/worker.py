"""The vehicle agent's main loop: register, heartbeat, lease units, run the model, report.

The agent keeps one outbound NATS connection (it never listens on a port). A fetcher task keeps
one leased unit in hand ahead of the one running, so the model never waits on the network. The
loop itself knows no workload: a unit goes to the `UnitRunner` of its model, which plans it into
runs and runs them; each run's finished results (opaque bytes) are sent at once (which commits
them and extends the lease) while the next run computes. On shutdown the agent releases what it
holds, so the coordinator re-queues it at once instead of waiting for the lease to expire.

Whether the car may compute is decided here, in the car, by the `ComputeGate` and its
`PolicyGuard`, fed by the state source on its own thread. The agent asks for work only while
the gate allows it; when the gate says stop, the running model run is cancelled on the spot
(by the gate, not by this loop), the requests already finished are submitted, the rest of the
unit and any unit held in reserve are released at once with the reason, and the next
heartbeat reports the car as paused, with why. The owner's policy comes from the coordinator:
pushed when the owner changes it, and fetched whenever a heartbeat shows a newer version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from idlefleet import __version__
from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.config import AgentConfig
from idlefleet.agent.energy import EnergyMeter
from idlefleet.agent.policy_guard import PolicyGuard, Verdict
from idlefleet.agent.sources.base import StateSource
from idlefleet.agent.supervise import run_until_stopped
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Heartbeat,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    RunReply,
    RunRequest,
    WireError,
    WireModel,
    WorkGrant,
    WorkItem,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import OwnerPolicy, PolicyRequest, PolicyUpdate
from idlefleet.protocol.seeds import nats_servers
from idlefleet.protocol.subjects import Downlink, Uplink
from idlefleet.workloads import for_model
from idlefleet.workloads.base import ItemResult, UnitRunner

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0


class VehicleAgent:
    def __init__(
        self, config: AgentConfig, runners: Mapping[str, UnitRunner], source: StateSource
    ) -> None:
        """``runners``: the models this car serves, by model id (what it registers and asks
        work for)."""
        if not runners:
            raise ValueError("an agent needs at least one model runner")
        self.config = config
        self.runners = dict(runners)
        self.source = source
        self.policy_version = 0
        self.gate = ComputeGate(
            PolicyGuard(OwnerPolicy(), config.resume_after_s),
            source.now,
            rated_power_w=config.hardware.power_w,
            battery_kwh=config.battery_kwh,
            meter=EnergyMeter(config.cache_dir / "state" / f"{config.vehicle_id}.energy.json"),
            on_change=self._verdict_changed_threadsafe,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._allowed = asyncio.Event()
        self._beat_now = asyncio.Event()
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
            models=sorted(self.runners),
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
            if reply.policy_version != self.policy_version:
                await self._fetch_policy()
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
            servers=nats_servers(self.config.nats_url),
            name=f"idlefleet-agent-{self.config.vehicle_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            reconnected_cb=on_reconnect,
        )
        self._loop = asyncio.get_running_loop()
        self.source.start(self.gate.on_reading)
        await self.nc.subscribe(
            subjects.downlink(self.config.vehicle_id, Downlink.RUN), cb=self._on_run
        )
        await self.nc.subscribe(
            subjects.downlink(self.config.vehicle_id, Downlink.POLICY), cb=self._on_policy_push
        )
        await self.register()
        units: asyncio.Queue[WorkGrant] = asyncio.Queue(maxsize=1 if self.config.prefetch else 0)
        died = await run_until_stopped(
            {
                "heartbeats": self._heartbeats(),
                "fetch-units": self._fetch_units(units),
                "run-units": self._run_units(units),
                "tick": self._tick(),
            },
            stop,
        )
        if died is not None:
            log.error("%s: %s; releasing its leases and stopping", self.config.vehicle_id, died)
        self.source.stop()
        while not units.empty():
            self._held.add(units.get_nowait().lease_id or "")
        await self._release_all("shutdown")
        self.gate.meter.save()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._online.shutdown(wait=False, cancel_futures=True)
        if died is not None:
            raise died  # the process exits non-zero: its supervisor sees it and restarts it

    # -- the gate's verdict and the owner's policy ---------------------------------------------
    def _verdict_changed_threadsafe(self, verdict: Verdict) -> None:
        """Called by the gate (on the source's thread) after it has already stopped the model."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._verdict_changed, verdict)

    def _verdict_changed(self, verdict: Verdict) -> None:
        if verdict.allowed:
            log.info("%s may compute", self.config.vehicle_id)
            self._allowed.set()
        else:
            log.info("%s paused: %s", self.config.vehicle_id, verdict.detail)
            self._allowed.clear()
        self._beat_now.set()  # tell the coordinator now, not at the next interval

    async def _tick(self) -> None:
        """Re-judge the car as time passes: allowed hours, departure, the hysteresis wait."""
        while True:
            await asyncio.sleep(0.2)
            self.gate.tick()

    def _apply_policy(self, update: PolicyUpdate) -> None:
        self.policy_version = update.version
        verdict = self.gate.set_policy(update.policy)
        log.info(
            "%s policy v%d (opted in: %s): %s",
            self.config.vehicle_id,
            update.version,
            update.policy.opted_in,
            verdict.summary(),
        )

    async def _fetch_policy(self) -> None:
        try:
            update = await self._call(Uplink.POLICY, PolicyRequest(), PolicyUpdate)
        except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
            log.warning("fetching the owner's policy failed: %s", exc)
            return
        assert isinstance(update, PolicyUpdate)
        if update.version != self.policy_version:
            self._apply_policy(update)

    async def _on_policy_push(self, msg: Msg) -> None:
        try:
            update = decode(PolicyUpdate, msg.data)
        except ProtocolError as exc:
            await msg.respond(
                encode(Ack(ok=False, error=WireError(code="bad_message", message=str(exc))))
            )
            return
        # Pushes can overtake each other; only a newer version replaces the one we enforce.
        if update.version > self.policy_version:
            self._apply_policy(update)
        await msg.respond(encode(Ack(policy_version=self.policy_version)))

    async def _release_all(self, reason: str) -> None:
        for lease_id in list(self._held):
            await self._release(lease_id, reason)

    async def _release(self, lease_id: str, reason: str) -> None:
        """Give a lease back at once, so its unfinished requests need not wait for expiry."""
        if lease_id:
            message = Release(
                lease_id=lease_id,
                reason=reason[:200],
                energy_j=self.gate.meter.take_lease(lease_id),
            )
            with contextlib.suppress(Exception):
                await self._call(Uplink.RELEASE, message, ReleaseAck, 2.0)
        self._held.discard(lease_id)

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)
            self._beat_now.clear()
            seq += 1
            verdict = self.gate.verdict
            beat = Heartbeat(
                seq=seq,
                status="paused" if not verdict.allowed else self._status,
                active_leases=sorted(self._held)[:16],
                reason=None if verdict.allowed else verdict.summary()[:200],
                policy_version=self.policy_version,
            )
            try:
                ack = await self._call(Uplink.HEARTBEAT, beat, Ack)
            except (nats.errors.Error, ProtocolError, TimeoutError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            assert isinstance(ack, Ack)
            if ack.error is not None and ack.error.code == "not_registered":
                await self.register()
            elif ack.policy_version != self.policy_version:
                await self._fetch_policy()

    async def _fetch_units(self, units: asyncio.Queue[WorkGrant]) -> None:
        request = WorkRequest(
            max_requests=self.config.max_unit_requests,
            models=sorted(self.runners),
            wait_s=self.config.long_poll_s,
        )
        while True:
            await self._registered.wait()
            await self._allowed.wait()  # a car that may not compute does not ask for work
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
                elif grant.error.code == "not_opted_in":
                    # The cloud's record says no: make sure we enforce its latest policy.
                    await self._fetch_policy()
                    await asyncio.sleep(min(grant.retry_after_s, 5.0))
                else:
                    await asyncio.sleep(1.0)
                continue
            if grant.lease_id is None:
                await asyncio.sleep(grant.retry_after_s if request.wait_s == 0 else 0)
                continue
            self._held.add(grant.lease_id)
            refusal = self._refusal(grant)
            if refusal is not None:
                log.warning(
                    "%s: giving back %s: %s", self.config.vehicle_id, grant.lease_id, refusal
                )
                await self._release(grant.lease_id, refusal)
                continue
            await units.put(grant)

    def _refusal(self, grant: WorkGrant) -> str | None:
        """Why this car must not run the granted unit, or None. The cloud filtered already;
        the car checks again because consent is the car's to enforce. A unit of a model this
        car has no runner for is an error (the car never asked for that model)."""
        if grant.model not in self.runners:
            return f"error: no runner for model {grant.model}"
        policy = self.gate.policy
        if not policy.opted_in:
            return "policy: opted out"
        if grant.purpose is None or grant.purpose not in policy.purposes:
            return f"policy: purpose {grant.purpose} not allowed"
        if grant.data_region is None or grant.data_region not in policy.data_regions:
            return f"policy: data region {grant.data_region} not allowed"
        if not self.gate.verdict.allowed:
            return f"preempted: {self.gate.verdict.summary()}"
        return None

    async def _run_units(self, units: asyncio.Queue[WorkGrant]) -> None:
        while True:
            grant = await units.get()
            self._status = "working"
            try:
                preempted = await self._run_unit(grant)
            except Exception as exc:  # one bad unit must not end the agent's work loop
                log.exception("unit %s failed; releasing it", grant.lease_id)
                await self._release(grant.lease_id or "", f"error: {type(exc).__name__}")
                preempted = False
            finally:
                self._held.discard(grant.lease_id or "")
                self._status = "idle" if units.empty() else "working"
            if preempted:
                # The unit held in reserve goes back too: the car may be gone for hours.
                reason = f"preempted: {self.gate.verdict.summary()}"
                while not units.empty():
                    await self._release(units.get_nowait().lease_id or "", reason)

    async def _run_unit(self, grant: WorkGrant) -> bool:
        """Run a unit; True if the gate stopped it (the rest of the lease is then released)."""
        assert grant.lease_id is not None and grant.model is not None
        runner = self.runners[grant.model]  # a grant of another model was refused on arrival
        loop = asyncio.get_running_loop()
        sends: list[asyncio.Task[bool]] = []
        # Planned on the compute thread before any run, so that no run has to tokenise (or do
        # other unstoppable work) before the gate can stop it.
        runs = await loop.run_in_executor(
            self._compute,
            runner.plan,
            [item.payload for item in grant.items],
            self.config.chunk_requests,
        )
        for run in runs:
            if sends and sends[-1].done() and not sends[-1].result():
                break  # the lease is gone: the coordinator re-queued the rest
            chunk = [grant.items[i] for i in run.indices]
            outcome = await loop.run_in_executor(
                self._compute,
                runner.run,
                self.gate,
                [item.payload for item in chunk],
                grant.lease_id,
                run.prepared,
            )
            finished = [
                (item, result)
                for item, result in zip(chunk, outcome.results, strict=True)
                if result is not None
            ]
            if finished:
                sends.append(asyncio.create_task(self._send(grant.lease_id, finished)))
            if not outcome.complete:
                await asyncio.gather(*sends, return_exceptions=True)
                why = f"preempted: {self.gate.verdict.summary()}"
                log.info(
                    "%s stopped %s: kept %d of %d requests in the chunk, releasing the rest (%s)",
                    self.config.vehicle_id,
                    grant.lease_id,
                    len(finished),
                    len(chunk),
                    why,
                )
                await self._release(grant.lease_id, why)
                return True
        await asyncio.gather(*sends, return_exceptions=True)
        return False

    async def _send(self, lease_id: str, finished: list[tuple[WorkItem, ItemResult]]) -> bool:
        """Send one chunk's results; True while the lease is still active."""
        message = ResultChunk(
            lease_id=lease_id,
            seqs=[item.seq for item, _ in finished],
            token_counts=[result.tokens for _, result in finished],
            sizes=[len(result.data) for _, result in finished],
            data_b64=pack(b"".join(result.data for _, result in finished)),
            energy_j=self.gate.meter.take_lease(lease_id),
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
    async def _on_run(self, msg: Msg) -> None:
        try:
            request = decode(RunRequest, msg.data)
        except ProtocolError as exc:
            await msg.respond(
                encode(RunReply(error=WireError(code="bad_message", message=str(exc))))
            )
            return
        runner = self.runners.get(request.model)
        workload = for_model(request.model)
        if runner is None or workload is None or workload.kind != request.kind:
            reply = RunReply(
                error=WireError(
                    code="unknown_model",
                    message=f"model {request.model} of {request.kind} not here",
                )
            )
        else:
            loop = asyncio.get_running_loop()
            try:
                outcome = await loop.run_in_executor(
                    self._online, runner.run, self.gate, [request.payload], None
                )
                result = outcome.results[0] if outcome.complete else None
                if result is not None:
                    reply = RunReply(token_count=result.tokens, data_b64=pack(result.data))
                else:
                    # The coordinator fails over to another car on an error reply.
                    reply = RunReply(
                        error=WireError(
                            code="vehicle_paused",
                            message=f"vehicle may not compute: {self.gate.verdict.summary()}",
                        )
                    )
            except Exception as exc:  # the car answers with an error rather than silence
                log.exception("online request failed")
                reply = RunReply(error=WireError(code="inference_failed", message=str(exc)[:500]))
        await msg.respond(encode(reply))
