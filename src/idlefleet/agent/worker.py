"""The vehicle agent's shell: NATS, threads and timers around the decision core.

Every decision (register, ask for work, plan and run a unit, report, give a lease back, pause,
resume, exit) is :class:`idlefleet.agent.core.AgentCore`'s, a pure state machine. This shell
turns what happens into its events (a reply from the coordinator, a model run that ended on the
compute thread, the compute gate's verdict, a reconnect, a stop), feeds them to it one at a time
on one task (``_decide``), and carries out the instructions it answers with, each as a task that
ends in exactly one event. It knows no workload: a unit goes to the `UnitRunner` of its model,
which plans it into runs and runs them; each run's finished results (opaque bytes) are sent at
once (which commits them and extends the lease) while the next run computes.

The agent keeps one outbound NATS connection (it never listens on a port). Whether the car may
compute is decided in the car by the `ComputeGate` and its `PolicyGuard`, fed by the state
source on its own thread: when the gate says stop, the running model run is cancelled on the
spot (by the gate, not by this loop), and the verdict reaches the core as an event (the finished
requests are reported, every lease handed back, the heartbeat sent at once as paused, with
why). The owner's policy comes from the coordinator: pushed when the owner changes it, and
fetched whenever a heartbeat or a registration shows a newer version.

Supervision: the decision loop, the heartbeats and the gate's clock run under
``supervise.run_until_stopped``; an instruction's task that raises something unexpected ends the
decision loop with it. Either way the agent winds down (reports, releases) and ``run`` raises
``AgentTaskDied``: the process exits non-zero, never live and idle.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from idlefleet import __version__
from idlefleet.agent import core
from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.config import AgentConfig
from idlefleet.agent.energy import EnergyMeter
from idlefleet.agent.policy_guard import PolicyGuard, Verdict
from idlefleet.agent.releases import CarReleases
from idlefleet.agent.sources.base import StateSource
from idlefleet.agent.supervise import AgentTaskDied, run_until_stopped
from idlefleet.agent.vehicle_state import StateReading
from idlefleet.models.distribution import DistributionError
from idlefleet.models.manifest import ManifestError
from idlefleet.protocol import subjects
from idlefleet.protocol.codec import ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Heartbeat,
    Progress,
    ProgressAck,
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
from idlefleet.workloads.base import ItemResult, PlannedRun, UnitRunner

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
CONNECT_PATIENCE_S = 30.0
RELEASE_RETRY_S = 30.0
ONLINE_REPORT_S = 1.0
"""How often an online request's run reports its progress: the coordinator keeps it, so a car
that leaves loses at most this much, and hears from the car at least this often."""
ONLINE_STREAM_REPORT_S = 0.0
"""The same for a streamed request: after every step (the client is watching)."""
WIND_DOWN_S = 8.0
"""On a stop, how long the agent may take to report what finished and give its leases back
(the embedded fleet waits 10 s after SIGTERM before it kills an agent)."""
_WIRE_ERRORS = (nats.errors.Error, ProtocolError, TimeoutError)


class VehicleAgent:
    def __init__(
        self,
        config: AgentConfig,
        runners: Mapping[str, UnitRunner],
        source: StateSource,
        releases: CarReleases | None = None,
    ) -> None:
        """``runners``: the models this car serves, by model id (what it registers and asks
        work for); ``releases``: the signed releases they were built from (None: built from
        this machine's packages, and grants' release digests are not checked)."""
        if not runners:
            raise ValueError("an agent needs at least one model runner")
        self.config = config
        self.runners = dict(runners)
        self.releases = releases
        self._updating: dict[str, asyncio.Task[None]] = {}
        self._refused_releases: dict[str, float] = {}
        """Releases refused, by digest, and when (not fetched again for a while)."""
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
        self.core = core.AgentCore(reserve=1 if config.prefetch else 0)
        self.nc: Client | None = None
        self.heartbeat_interval_s = 5.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[core.Event] = asyncio.Queue()
        self._beat_now = asyncio.Event()
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._online = ThreadPoolExecutor(1, thread_name_prefix="online")
        self._doing: dict[asyncio.Task[None], core.Instruction] = {}
        """Instructions being carried out, by their task."""
        self._failed: BaseException | None = None
        """What an instruction's task raised that it should not have (ends the agent)."""
        # What the core refers to by lease and run: the shell keeps the data.
        self._grants: dict[str, WorkGrant] = {}
        self._runs: dict[str, list[PlannedRun]] = {}
        self._finished: dict[tuple[str, int], list[tuple[WorkItem, ItemResult]]] = {}
        self._progress_sends: set[asyncio.Task[None]] = set()

    # -- wire helpers --------------------------------------------------------------------------
    async def _call(
        self, verb: Uplink, message: WireModel, reply_type: type, timeout: float = REQUEST_TIMEOUT_S
    ) -> WireModel:
        assert self.nc is not None
        raw = await self.nc.request(
            subjects.uplink(self.config.vehicle_id, verb), encode(message), timeout=timeout
        )
        return decode(reply_type, raw.data)

    async def _connect(self, on_reconnect: Callable[[], Awaitable[None]]) -> Client:
        return await connect_car(self.config, on_reconnect)

    # -- main ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then report, release held leases and disconnect."""

        async def on_reconnect() -> None:
            # The coordinator may have restarted meanwhile: the core registers again.
            self._post(core.Reconnected())

        self.nc = await self._connect(on_reconnect)
        self._loop = asyncio.get_running_loop()
        self.source.start(self.gate.on_reading)
        await self.nc.subscribe(
            subjects.downlink(self.config.vehicle_id, Downlink.RUN), cb=self._on_run
        )
        await self.nc.subscribe(
            subjects.downlink(self.config.vehicle_id, Downlink.POLICY), cb=self._on_policy_push
        )
        self._post(core.Started())
        self._post_verdict(self.gate.verdict)
        died = await run_until_stopped(
            {
                "decide": self._decide(),
                "heartbeats": self._heartbeats(),
                "tick": self._tick(),
            },
            stop,
        )
        if died is not None and isinstance(died.cause, AgentTaskDied):
            died = died.cause  # an instruction's task died, and the decision loop with it
        if died is not None:
            log.error("%s: %s; releasing its leases and stopping", self.config.vehicle_id, died)
        self.source.stop()
        await self._wind_down()
        self.gate.meter.save()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._online.shutdown(wait=False, cancel_futures=True)
        if died is not None:
            raise died  # the process exits non-zero: its supervisor sees it and restarts it

    async def _decide(self) -> None:
        """Feed events to the core one at a time and carry out what it says, until it exits."""
        while not self.core.exited:
            event = await self._events.get()
            for instruction in self.core.handle(event):
                self._do(instruction)
            if self._failed is not None:
                raise self._failed

    async def _wind_down(self) -> None:
        """Stop: the core reports what finished and gives every lease back, then exits.
        Waits (``WIND_DOWN_S`` at most) are cut short; if the core cannot finish, whatever it
        still holds is released directly."""
        for task, instruction in list(self._doing.items()):
            if isinstance(instruction, core.Fetch | core.FetchLater | core.Register):
                task.cancel()  # each answers its event on the way out
        self._post(core.Stop())
        self._failed = None
        try:
            await asyncio.wait_for(self._decide(), WIND_DOWN_S)
        except Exception as exc:
            log.error(
                "%s: winding down failed (%r); releasing directly", self.config.vehicle_id, exc
            )
            for lease_id in self.core.held:
                await self._release(lease_id, "shutdown")
        for task in list(self._doing):
            task.cancel()

    def _post(self, event: core.Event) -> None:
        self._events.put_nowait(event)

    def _do(self, instruction: core.Instruction) -> None:
        match instruction:
            case core.BeatNow():
                self._beat_now.set()
                return
            case core.Exit():
                return
            case core.Register(delay_s):
                work: Coroutine[Any, Any, core.Event] = self._register(delay_s)
            case core.Fetch():
                work = self._fetch()
            case core.FetchLater(after_s):
                work = self._fetch_later(after_s)
            case core.Plan(lease_id):
                work = self._plan(lease_id)
            case core.Run(lease_id, run):
                work = self._run(lease_id, run)
            case core.Send(lease_id, run):
                work = self._send(lease_id, run)
            case core.Release(lease_id, reason):
                work = self._give_back(lease_id, reason)
            case _:
                raise AssertionError(f"unknown instruction {instruction!r}")
        task = asyncio.create_task(self._answer(work))
        self._doing[task] = instruction
        task.add_done_callback(self._done)

    async def _answer(self, work: Coroutine[Any, Any, core.Event]) -> None:
        self._post(await work)

    def _done(self, task: asyncio.Task[None]) -> None:
        instruction = self._doing.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or instruction is None:
            return
        # A bug, not a refusal or a network error (those are events): the agent stops. The
        # core hears of the stop first (its leases go back as "shutdown": the car is leaving,
        # the requests did nothing wrong), then the instruction's answer as a failure.
        log.error("%s: %r raised %r", self.config.vehicle_id, instruction, exc)
        if self._failed is None:
            self._failed = AgentTaskDied(type(instruction).__name__.lower(), exc)
        self._post(core.Stop())
        self._post(_failure(instruction, exc))

    # -- instructions: each returns the event that answers it ----------------------------------
    async def _register(self, delay_s: float) -> core.Event:
        try:
            await asyncio.sleep(delay_s)
            await self.register()
        except asyncio.CancelledError:
            self._post(core.RegistrationFailed())
            raise
        except _WIRE_ERRORS as exc:
            log.warning("registration failed (%s); retrying", exc)
            return core.RegistrationFailed()
        return core.Registered()

    async def register(self) -> None:
        """Register once (``RuntimeError`` if the coordinator refuses this car)."""
        request = RegisterRequest(
            protocol_version=PROTOCOL_VERSION,
            agent_version=__version__,
            hardware=self.config.hardware,
            models=sorted(self.runners),
        )
        reply = await self._call(Uplink.REGISTER, request, RegisterReply)
        assert isinstance(reply, RegisterReply)
        if not reply.accepted:
            raise RuntimeError(f"coordinator refused registration: {reply.error}")
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        log.info("%s registered", self.config.vehicle_id)
        if reply.policy_version != self.policy_version:
            await self._fetch_policy()

    async def _fetch(self) -> core.Event:
        if not set(self.runners) - self._pending_models():
            return core.NoWork(5.0)  # every model waits for its new release: nothing to ask
        request = WorkRequest(
            max_requests=self.config.max_unit_requests,
            min_requests=min(
                self.config.max_unit_requests,
                max(r.preferred_requests for r in self.runners.values()),
            ),
            # A model whose named release is being fetched is not asked for meanwhile: every
            # unit of it would only be given back.
            models=sorted(m for m in self.runners if m not in self._pending_models()),
            wait_s=self.config.long_poll_s,
        )
        try:
            grant = await self._call(
                Uplink.WORK, request, WorkGrant, timeout=self.config.long_poll_s + 10
            )
        except asyncio.CancelledError:
            self._post(core.NoWork(0.0))  # nothing was granted that this car saw
            raise
        except _WIRE_ERRORS as exc:
            log.warning("work request failed: %s", exc)
            return core.NoWork(1.0)
        assert isinstance(grant, WorkGrant)
        if grant.error is not None:
            log.warning("work refused: %s", grant.error.message)
            if grant.error.code == "not_registered":
                return core.NotRegistered()
            if grant.error.code == "not_opted_in":
                # The cloud's record says no: make sure we enforce its latest policy.
                await self._fetch_policy()
                return core.NoWork(min(grant.retry_after_s, 5.0))
            return core.NoWork(1.0)
        if grant.lease_id is None:
            return core.NoWork(grant.retry_after_s if request.wait_s == 0 else 0.0)
        refusal = self._refusal(grant)
        if refusal is not None:
            log.warning("%s: giving back %s: %s", self.config.vehicle_id, grant.lease_id, refusal)
        else:
            self._grants[grant.lease_id] = grant
        return core.Granted(grant.lease_id, refusal)

    async def _fetch_later(self, after_s: float) -> core.Event:
        try:
            await asyncio.sleep(after_s)
        except asyncio.CancelledError:
            self._post(core.FetchAgain())
            raise
        return core.FetchAgain()

    def _refusal(self, grant: WorkGrant) -> str | None:
        """Why this car must not run the granted unit, or None. The cloud filtered already;
        the car checks again because consent is the car's to enforce. A unit of a model this
        car has no runner for is an error (the car never asked for that model)."""
        if grant.model not in self.runners:
            return f"error: no runner for model {grant.model}"
        if self.releases is not None and grant.model_digest is not None:
            held = self.releases.held.get(grant.model)
            if held != grant.model_digest:
                self._update_model(grant.model, grant.model_digest)
                return (
                    f"model: release {grant.model_digest[:12]} of {grant.model} not held "
                    f"(this car runs {(held or 'none')[:12]}); fetching it"
                )
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

    def _pending_models(self) -> set[str]:
        return {model for model, task in self._updating.items() if not task.done()}

    def _update_model(self, model: str, digest: str) -> None:
        """Fetch release ``digest`` of ``model`` and swap its runner in, in the background,
        once (a unit of it came for a release this car does not hold)."""
        running = self._updating.get(model)
        if running is not None and not running.done():
            return
        refused_at = self._refused_releases.get(digest)
        if refused_at is not None and time.monotonic() - refused_at < RELEASE_RETRY_S * 10:
            return  # refused a moment ago: the same bytes would be refused again
        task = asyncio.create_task(self._fetch_release(model, digest))
        self._updating[model] = task

    async def _fetch_release(self, model: str, digest: str) -> None:
        assert self.releases is not None and self.nc is not None
        while True:
            reading = self.gate.reading
            if reading is not None and reading.state.is_charging:
                break  # a download costs energy and data: prefetch while charging
            await asyncio.sleep(RELEASE_RETRY_S)
        workload = for_model(model)
        try:
            _, source = await self.releases.fetch(self.nc.jetstream(), model, digest)
            assert workload is not None
            runner = await asyncio.get_running_loop().run_in_executor(
                None,
                workload.runner_at,
                self.config.hardware.precision,
                model,
                self.config.cache_dir,
                self.config.threads,
                source,
            )
        except ManifestError as exc:  # keep the release we hold
            self.releases.refuse(model, exc)
            self._refused_releases[digest] = time.monotonic()
            return
        except DistributionError as exc:  # the next unit of it tries again
            log.warning("model %s: release %s not fetched: %s", model, digest[:12], exc)
            return
        except Exception:  # its graph would not build or load: keep the release we hold
            log.exception("model %s: release %s could not be loaded", model, digest[:12])
            return
        self.runners[model] = runner
        self.releases.held[model] = digest
        log.info("model %s now runs release %s", model, digest[:12])

    async def _plan(self, lease_id: str) -> core.Event:
        """Plan on the compute thread before any run, so that no run has to tokenise (or do
        other unstoppable work) before the gate can stop it."""
        grant = self._grants[lease_id]
        assert grant.model is not None
        runner = self.runners[grant.model]  # a grant of another model was refused on arrival
        try:
            runs = await asyncio.get_running_loop().run_in_executor(
                self._compute,
                runner.plan,
                [item.payload for item in grant.items],
                self.config.chunk_requests,
            )
        except Exception as exc:  # a payload the runner cannot read: the unit fails, not the car
            log.exception("%s: planning %s failed", self.config.vehicle_id, lease_id)
            return core.PlanFailed(lease_id, type(exc).__name__)
        self._runs[lease_id] = runs
        return core.Planned(lease_id, len(runs))

    async def _run(self, lease_id: str, index: int) -> core.Event:
        grant = self._grants[lease_id]
        assert grant.model is not None
        run = self._runs[lease_id][index]
        chunk = [grant.items[i] for i in run.indices]
        loop = asyncio.get_running_loop()

        def report(parts: list[tuple[int, bytes]]) -> None:  # on the compute thread
            items = [(chunk[i].seq, data) for i, data in parts]
            loop.call_soon_threadsafe(self._report_progress, lease_id, items)

        try:
            progress = [
                None if item.progress_b64 is None else binascii.a2b_base64(item.progress_b64)
                for item in chunk
            ]
            outcome = await loop.run_in_executor(
                self._compute,
                functools.partial(
                    self.runners[grant.model].run,
                    self.gate,
                    [item.payload for item in chunk],
                    lease_id,
                    run.prepared,
                    progress,
                    report,
                    # Progress extends the lease: report well inside it.
                    report_every_s=grant.lease_seconds / 3 if grant.lease_seconds > 0 else None,
                ),
            )
        except Exception as exc:  # one bad unit must not end the agent's work
            log.exception("%s: a run of %s failed; releasing it", self.config.vehicle_id, lease_id)
            return core.RunFailed(lease_id, index, type(exc).__name__)
        finished = [
            (item, result)
            for item, result in zip(chunk, outcome.results, strict=True)
            if result is not None
        ]
        if finished:
            self._finished[(lease_id, index)] = finished
        if not outcome.complete:
            log.info(
                "%s stopped %s: kept %d of %d requests in the run, releasing the rest (%s)",
                self.config.vehicle_id,
                lease_id,
                len(finished),
                len(chunk),
                self.gate.verdict.summary(),
            )
        return core.RunEnded(lease_id, index, len(finished), outcome.complete)

    async def _send(self, lease_id: str, index: int) -> core.Event:
        """Send one run's results (three tries); the event says whether the lease lives on."""
        finished = self._finished.pop((lease_id, index))
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
            except _WIRE_ERRORS as exc:
                log.warning("sending results failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            assert isinstance(ack, ResultAck)
            if ack.error is not None:
                log.warning("results refused: %s", ack.error.message)
                return core.Sent(lease_id, index, lease_active=False)
            return core.Sent(lease_id, index, lease_active=ack.lease_active)
        return core.Sent(lease_id, index, lease_active=False)

    def _report_progress(self, lease_id: str, items: list[tuple[int, bytes]]) -> None:
        """Send a run's progress (its unfinished requests' work so far) without waiting: the
        coordinator keeps it for the next car and extends the lease; the run goes on."""
        task = asyncio.create_task(self._send_progress(lease_id, items))
        self._progress_sends.add(task)
        task.add_done_callback(self._progress_sends.discard)

    async def _send_progress(self, lease_id: str, items: list[tuple[int, bytes]]) -> None:
        message = Progress(
            lease_id=lease_id,
            seqs=[seq for seq, _ in items],
            sizes=[len(data) for _, data in items],
            data_b64=pack(b"".join(data for _, data in items)),
        )
        try:
            ack = await self._call(Uplink.PROGRESS, message, ProgressAck)
        except _WIRE_ERRORS as exc:
            log.warning("sending progress of %s failed: %s", lease_id, exc)
            return
        assert isinstance(ack, ProgressAck)
        if ack.error is not None:
            log.warning("progress of %s refused: %s", lease_id, ack.error.message)

    async def _give_back(self, lease_id: str, reason: str) -> core.Event:
        await self._release(lease_id, reason)
        self._grants.pop(lease_id, None)
        self._runs.pop(lease_id, None)
        return core.ReleaseDone(lease_id)

    async def _release(self, lease_id: str, reason: str) -> None:
        """Give a lease back at once, so its unfinished requests need not wait for expiry."""
        message = Release(
            lease_id=lease_id, reason=reason[:200], energy_j=self.gate.meter.take_lease(lease_id)
        )
        with contextlib.suppress(Exception):
            await self._call(Uplink.RELEASE, message, ReleaseAck, 2.0)

    # -- the gate's verdict and the owner's policy ---------------------------------------------
    def _verdict_changed_threadsafe(self, verdict: Verdict) -> None:
        """Called by the gate (on the source's thread) after it has already stopped the model."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._post_verdict, verdict)

    def _post_verdict(self, verdict: Verdict) -> None:
        if verdict.allowed:
            log.info("%s may compute", self.config.vehicle_id)
        else:
            log.info("%s paused: %s", self.config.vehicle_id, verdict.detail)
        self._post(core.VerdictChanged(verdict.allowed, verdict.summary()))

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
        except _WIRE_ERRORS as exc:
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

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)
            self._beat_now.clear()
            if not self.core.registered:
                continue
            seq += 1
            verdict = self.gate.verdict
            figures = self.gate.figures.take()
            beat = Heartbeat(
                seq=seq,
                status="paused" if not verdict.allowed else self.core.status,
                active_leases=self.core.held[:16],
                reason=None if verdict.allowed else verdict.summary()[:200],
                policy_version=self.policy_version,
                releases_refused=0 if self.releases is None else self.releases.refused,
                figures=figures,
                location=_location(self.gate.reading),
            )
            try:
                ack = await self._call(Uplink.HEARTBEAT, beat, Ack)
            except _WIRE_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
                if figures is not None:
                    self.gate.figures.put_back(figures)
                continue
            assert isinstance(ack, Ack)
            if not ack.ok and figures is not None:
                self.gate.figures.put_back(figures)
            if ack.error is not None and ack.error.code == "not_registered":
                self._post(core.Reconnected())
            elif ack.policy_version != self.policy_version:
                await self._fetch_policy()

    # -- online requests -----------------------------------------------------------------------
    async def _on_run(self, msg: Msg) -> None:
        """Run an online request: partial replies while it runs (progress), then the result."""
        if not msg.reply:
            return  # nobody to answer (not the coordinator's request)
        try:
            request = decode(RunRequest, msg.data)
            progress = request.progress()
        except ValueError as exc:  # ProtocolError, or progress_b64 not base64
            await msg.respond(
                encode(RunReply(error=WireError(code="bad_message", message=str(exc)[:500])))
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
            await msg.respond(encode(reply))
            return
        assert self.nc is not None
        nc, loop = self.nc, asyncio.get_running_loop()
        latest: list[bytes] = []

        def publish(data: bytes) -> None:  # on the loop
            latest[:] = [data]
            partial = RunReply(partial=True, progress_b64=pack(data))
            task = asyncio.ensure_future(nc.publish(msg.reply, encode(partial)))
            self._progress_sends.add(task)
            task.add_done_callback(self._progress_sends.discard)

        def report(parts: list[tuple[int, bytes]]) -> None:  # on the online thread
            for _, data in parts:
                loop.call_soon_threadsafe(publish, data)

        try:
            outcome = await loop.run_in_executor(
                self._online,
                functools.partial(
                    runner.run,
                    self.gate,
                    [request.payload],
                    request.request_id,  # its energy is metered under its id
                    progress=None if progress is None else [progress],
                    report=report,
                    report_every_s=ONLINE_STREAM_REPORT_S if request.stream else ONLINE_REPORT_S,
                ),
            )
            await asyncio.sleep(0)  # the last reports' publishes go out before the reply
            result = outcome.results[0] if outcome.complete else None
            energy_j = self.gate.meter.take_lease(request.request_id)
            if result is not None:
                reply = RunReply(
                    token_count=result.tokens, data_b64=pack(result.data), energy_j=energy_j
                )
            else:
                # The coordinator goes on on another car, from the progress reported.
                reply = RunReply(
                    progress_b64=pack(latest[0]) if latest else "",
                    error=WireError(
                        code="vehicle_paused",
                        message=f"vehicle may not compute: {self.gate.verdict.summary()}",
                    ),
                )
        except Exception as exc:  # the car answers with an error rather than silence
            log.exception("online request failed")
            self.gate.meter.take_lease(request.request_id)
            reply = RunReply(error=WireError(code="inference_failed", message=str(exc)[:500]))
        await msg.respond(encode(reply))


async def connect_car(
    config: AgentConfig, on_reconnect: Callable[[], Awaitable[None]] | None = None
) -> Client:
    """One outbound connection, as this car (its nkey) with its own reply inbox.

    A refused first connect is retried for ``CONNECT_PATIENCE_S``: a car may start a moment
    before its enrolment reaches the NATS server."""
    vid = config.vehicle_id
    options: dict[str, Any] = {"inbox_prefix": subjects.inbox_prefix(vid)}
    if config.nkey_seed is not None:
        options["nkeys_seed_str"] = config.nkey_seed
    if config.nats_ca is not None:
        options["tls"] = ssl.create_default_context(cafile=str(config.nats_ca))
    if on_reconnect is not None:
        options["reconnected_cb"] = on_reconnect

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            log.error("NATS refused this car's credentials (revoked or not enrolled)")
        elif "permissions violation" in str(exc).lower():
            log.error("NATS refused: %s", exc)

    deadline = time.monotonic() + CONNECT_PATIENCE_S
    while True:
        try:
            return await nats.connect(
                servers=nats_servers(config.nats_url),
                name=f"idlefleet-agent-{vid}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                **options,
            )
        except (nats.errors.Error, ConnectionError) as exc:
            # A server applying the reload that admits a just-enrolled car closes the
            # connection ("Connection lost") or refuses it for a moment.
            refused = "authorization" in str(exc).lower() or isinstance(exc, ConnectionError)
            if not refused or time.monotonic() > deadline:
                raise
            log.warning("NATS refused this car's connection; retrying: %s", exc)
            await asyncio.sleep(0.5)


async def fetch_releases(
    config: AgentConfig, releases: CarReleases, models: Sequence[str]
) -> dict[str, Path]:
    """Fetch and verify the current release of each model (before any is loaded); the folder
    of each one's files. A model whose release is refused (unsigned, tampered, another key's,
    expired, older) or cannot be fetched is left out, and said so; the car serves the rest."""
    nc = await connect_car(config)
    sources = {}
    try:
        js = nc.jetstream()
        for model in models:
            try:
                digest, sources[model] = await releases.fetch(js, model)
            except ManifestError as exc:
                releases.refuse(model, exc)
                continue
            except DistributionError as exc:  # not there, or the transfer broke: not refused
                log.error("model %s: no release could be fetched: %s", model, exc)
                continue
            releases.held[model] = digest  # the runners are built from these next
    finally:
        await nc.close()
    return sources


def _location(reading: StateReading | None) -> tuple[float, float] | None:
    """Where the car is, to two decimals (about a kilometre: enough for the operators' map,
    not enough to point at the owner's house), or None without a location reading."""
    if reading is None or reading.error is not None:
        return None
    lat, lon = reading.state.latitude, reading.state.longitude
    if lat is None or lon is None:
        return None
    return (round(lat, 2), round(lon, 2))


def _failure(instruction: core.Instruction, exc: BaseException) -> core.Event:
    """The event that answers ``instruction`` when its task raised ``exc`` (a bug)."""
    why = type(exc).__name__
    match instruction:
        case core.Register():
            return core.RegistrationFailed()
        case core.Fetch():
            return core.NoWork(0.0)
        case core.FetchLater():
            return core.FetchAgain()
        case core.Plan(lease_id):
            return core.PlanFailed(lease_id, why)
        case core.Run(lease_id, run):
            return core.RunFailed(lease_id, run, why)
        case core.Send(lease_id, run):
            return core.Sent(lease_id, run, lease_active=True)
        case core.Release(lease_id, _):
            return core.ReleaseDone(lease_id)
    raise AssertionError(f"{instruction!r} has no answer")
