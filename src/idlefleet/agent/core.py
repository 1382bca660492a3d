"""The agent's decisions, as a pure state machine: ``AgentCore.handle(event) -> instructions``.

The shell (:mod:`idlefleet.agent.worker`) does the I/O: it turns what happens (a reply from the
coordinator, a model run that ended, the compute gate's verdict, a stop) into an event, hands it
to :meth:`AgentCore.handle`, and carries out the instructions it gets back, each of which ends in
another event. Everything the agent decides — when to register, to ask for work, to plan and run
a unit, to report results, to give a lease back, to pause and resume — is decided here, with no
clock, thread or socket, so that it can be tested bare and over random event sequences.

The rules it keeps (tests/agent/test_core.py holds it to them over random event sequences):

* **The gate's permit.** A run is started only while the last verdict allowed computing and the
  agent is not stopping. (The gate itself also refuses and stops runs on the compute thread: the
  core never relies on the timing of the verdict's event.)
* **No lost result.** Every run that finished requests is reported (``Send``) before anything
  else happens to its lease; a lease is released only after its reports are answered.
* **Every lease ends.** A lease granted is either finished (all its runs reported, or the
  coordinator said it is no longer active) or released (with the reason: a refusal, a pause,
  an error, the shutdown); after ``Stop``, once the last one has ended, the core says ``Exit``.
* **One unit in hand.** At most one work request is outstanding, and the agent holds at most
  ``1 + reserve`` units (the running one and the ones fetched ahead), so the model never waits on
  the network and a car that leaves gives little back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AgentCore",
    "BeatNow",
    "Event",
    "Exit",
    "Fetch",
    "FetchAgain",
    "FetchLater",
    "Granted",
    "Instruction",
    "NoWork",
    "NotRegistered",
    "Plan",
    "PlanFailed",
    "Planned",
    "Reconnected",
    "Register",
    "Registered",
    "RegistrationFailed",
    "Release",
    "ReleaseDone",
    "Run",
    "RunEnded",
    "RunFailed",
    "Send",
    "Sent",
    "Started",
    "Stop",
    "VerdictChanged",
]


# -- events (what happened) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The connection is up: register."""


@dataclass(frozen=True)
class Registered:
    """The coordinator accepted the registration."""


@dataclass(frozen=True)
class RegistrationFailed:
    """Registration did not get through (the shell waits, then registers again)."""


@dataclass(frozen=True)
class NotRegistered:
    """The coordinator does not know this car (it restarted, or the car reconnected)."""


@dataclass(frozen=True)
class Reconnected:
    """The connection came back: register again (the coordinator may have restarted)."""


@dataclass(frozen=True)
class VerdictChanged:
    """The compute gate's verdict: may the car compute now, and if not, why."""

    allowed: bool
    summary: str = ""


@dataclass(frozen=True)
class Granted:
    """A unit was leased to this car. ``refusal``: why the car must not run it (its owner's
    policy, which the car checks again; no runner for its model), or None."""

    lease_id: str
    refusal: str | None = None


@dataclass(frozen=True)
class NoWork:
    """The work request came back empty (or failed): ask again after ``retry_after_s``."""

    retry_after_s: float = 0.0


@dataclass(frozen=True)
class FetchAgain:
    """The wait after an empty work request is over."""


@dataclass(frozen=True)
class Planned:
    """The runner cut the unit into ``runs`` model runs."""

    lease_id: str
    runs: int


@dataclass(frozen=True)
class PlanFailed:
    lease_id: str
    error: str


@dataclass(frozen=True)
class RunEnded:
    """A model run ended: ``finished`` requests have results (to report); ``complete``: all
    of the run's requests did (not stopped by the gate, not refused)."""

    lease_id: str
    run: int
    finished: int
    complete: bool


@dataclass(frozen=True)
class RunFailed:
    """A model run raised (a bad payload, the runtime failed)."""

    lease_id: str
    run: int
    error: str


@dataclass(frozen=True)
class Sent:
    """The coordinator answered a run's report; ``lease_active`` False: the lease is over there
    (expired, or another car's result won), so the rest of the unit is dropped."""

    lease_id: str
    run: int
    lease_active: bool


@dataclass(frozen=True)
class ReleaseDone:
    """The release was sent (answered or not: the lease expires on the coordinator anyway)."""

    lease_id: str


@dataclass(frozen=True)
class Stop:
    """Shut down: run nothing new, report what finished, give back every lease, then exit."""


Event = (
    Started
    | Registered
    | RegistrationFailed
    | NotRegistered
    | Reconnected
    | VerdictChanged
    | Granted
    | NoWork
    | FetchAgain
    | Planned
    | PlanFailed
    | RunEnded
    | RunFailed
    | Sent
    | ReleaseDone
    | Stop
)


# -- instructions (what to do) ------------------------------------------------------------------
@dataclass(frozen=True)
class Register:
    """Register (after ``delay_s``); answer ``Registered`` or ``RegistrationFailed``."""

    delay_s: float = 0.0


@dataclass(frozen=True)
class Fetch:
    """Ask for a unit (long poll); answer ``Granted``, or ``NoWork`` / ``NotRegistered``."""


@dataclass(frozen=True)
class FetchLater:
    """Wait ``after_s``, then answer ``FetchAgain``."""

    after_s: float


@dataclass(frozen=True)
class Plan:
    """Cut the unit into runs (compute thread); answer ``Planned`` or ``PlanFailed``."""

    lease_id: str


@dataclass(frozen=True)
class Run:
    """Run one planned run through the gate (compute thread); answer ``RunEnded``/``RunFailed``."""

    lease_id: str
    run: int


@dataclass(frozen=True)
class Send:
    """Report the finished requests of a run; answer ``Sent``."""

    lease_id: str
    run: int


@dataclass(frozen=True)
class Release:
    """Give the lease back with ``reason``; answer ``ReleaseDone``."""

    lease_id: str
    reason: str


@dataclass(frozen=True)
class BeatNow:
    """Send a heartbeat now (the status changed); no answer."""


@dataclass(frozen=True)
class Exit:
    """Everything is given back: the shell may close."""


Instruction = Register | Fetch | FetchLater | Plan | Run | Send | Release | BeatNow | Exit


# -- state --------------------------------------------------------------------------------------
@dataclass
class _Unit:
    lease_id: str
    runs: int | None = None
    """Planned runs (None: not planned yet)."""
    next_run: int = 0
    """The next run to start."""
    running: bool = False
    """A ``Plan`` or ``Run`` of this unit is in flight."""
    sending: set[int] = field(default_factory=set)
    """Runs whose report is in flight."""
    ending: str | None = None
    """Why the unit stops early (released once nothing of it is in flight); None: it goes on."""
    lease_over: bool = False
    """The coordinator said the lease is no longer active: nothing to release."""

    @property
    def busy(self) -> bool:
        return self.running or bool(self.sending)

    @property
    def all_run(self) -> bool:
        return self.runs is not None and self.next_run >= self.runs


@dataclass
class AgentCore:
    """The agent's state and decisions. Not thread-safe: one event at a time (the shell's loop)."""

    reserve: int = 1
    """Units fetched ahead of the running one."""
    registered: bool = False
    allowed: bool = False
    """The gate's last verdict."""
    pause_reason: str = "starting"
    stopping: bool = False
    exited: bool = False
    units: list[_Unit] = field(default_factory=list)
    """Held units, the running one first."""
    releasing: set[str] = field(default_factory=set)
    """Leases whose ``Release`` is in flight."""
    fetching: bool = False
    """A ``Fetch`` (or its ``FetchLater`` wait) is in flight."""
    registering: bool = False

    # -- what the heartbeat says -----------------------------------------------------------------
    @property
    def status(self) -> Literal["idle", "working", "paused"]:
        if not self.allowed:
            return "paused"
        return "working" if self.units else "idle"

    @property
    def held(self) -> list[str]:
        """Leases this car holds (for the heartbeat): its units and the releases in flight."""
        return [u.lease_id for u in self.units] + sorted(self.releasing)

    # -- the one entry point ---------------------------------------------------------------------
    def handle(self, event: Event) -> list[Instruction]:
        if self.exited:
            return []  # the shell is closing: nothing more to decide
        handler: Callable[[AgentCore, Event], list[Instruction]] = _HANDLERS[type(event)]
        out = handler(self, event)
        return out + self._advance()

    # -- events ----------------------------------------------------------------------------------
    def _started(self, _: Event) -> list[Instruction]:
        return self._register(0.0)

    def _registered(self, _: Event) -> list[Instruction]:
        self.registering = False
        self.registered = True
        return [BeatNow()]  # the coordinator learns the car's status at once

    def _registration_failed(self, _: Event) -> list[Instruction]:
        self.registering = False
        return [] if self.stopping else self._register(1.0)

    def _not_registered(self, _: Event) -> list[Instruction]:
        self.fetching = False
        self.registered = False
        return [] if self.stopping else self._register(0.0)

    def _reconnected(self, _: Event) -> list[Instruction]:
        # A work request in flight ends on its own (an error or not_registered): not touched.
        self.registered = False
        return [] if self.stopping else self._register(0.0)

    def _verdict(self, event: Event) -> list[Instruction]:
        assert isinstance(event, VerdictChanged)
        was, reason = self.allowed, self.pause_reason
        self.allowed = event.allowed
        self.pause_reason = "" if event.allowed else event.summary
        if not event.allowed:
            # The gate has already stopped the running model; every unit goes back (the car
            # may be gone for hours), each once nothing of it is in flight.
            why = f"preempted: {event.summary}"
            for unit in self.units:
                unit.ending = unit.ending or why
        changed = was != event.allowed or (not event.allowed and reason != event.summary)
        return [BeatNow()] if changed else []  # the status (or why paused) changed: say so

    def _granted(self, event: Event) -> list[Instruction]:
        assert isinstance(event, Granted)
        self.fetching = False
        reason = event.refusal
        if reason is None and self.stopping:
            reason = "shutdown"
        if reason is None and not self.allowed:
            reason = f"preempted: {self.pause_reason}"
        if reason is not None:
            self.releasing.add(event.lease_id)
            return [Release(event.lease_id, reason)]
        self.units.append(_Unit(event.lease_id))
        return []

    def _no_work(self, event: Event) -> list[Instruction]:
        assert isinstance(event, NoWork)
        if event.retry_after_s > 0:
            return [FetchLater(event.retry_after_s)]  # still "fetching": one request at a time
        self.fetching = False
        return []

    def _fetch_again(self, _: Event) -> list[Instruction]:
        self.fetching = False
        return []

    def _planned(self, event: Event) -> list[Instruction]:
        assert isinstance(event, Planned)
        unit = self._unit(event.lease_id)
        unit.running = False
        unit.runs = event.runs
        return []

    def _plan_failed(self, event: Event) -> list[Instruction]:
        assert isinstance(event, PlanFailed)
        unit = self._unit(event.lease_id)
        unit.running = False
        unit.ending = unit.ending or f"error: {event.error}"
        return []

    def _run_ended(self, event: Event) -> list[Instruction]:
        assert isinstance(event, RunEnded)
        unit = self._unit(event.lease_id)
        unit.running = False
        out: list[Instruction] = []
        if event.finished:
            unit.sending.add(event.run)
            out.append(Send(unit.lease_id, event.run))
        if not event.complete and unit.ending is None:
            # Stopped or refused by the gate: its verdict event may not have arrived yet.
            unit.ending = f"preempted: {self.pause_reason or 'stopped'}"
        return out

    def _run_failed(self, event: Event) -> list[Instruction]:
        assert isinstance(event, RunFailed)
        unit = self._unit(event.lease_id)
        unit.running = False
        unit.ending = unit.ending or f"error: {event.error}"
        return []

    def _sent(self, event: Event) -> list[Instruction]:
        assert isinstance(event, Sent)
        unit = self._unit(event.lease_id)
        unit.sending.discard(event.run)
        if not event.lease_active:
            unit.lease_over = True
        return []

    def _release_done(self, event: Event) -> list[Instruction]:
        assert isinstance(event, ReleaseDone)
        self.releasing.discard(event.lease_id)
        return []

    def _stop(self, _: Event) -> list[Instruction]:
        self.stopping = True
        for unit in self.units:
            unit.ending = unit.ending or "shutdown"
        return []

    # -- decisions after every event -------------------------------------------------------------
    def _advance(self) -> list[Instruction]:
        out: list[Instruction] = []
        # Units that are over: finished, lease gone, or ending with nothing in flight.
        kept: list[_Unit] = []
        for unit in self.units:
            if unit.busy:
                kept.append(unit)
            elif unit.lease_over or (unit.all_run and unit.ending is None):
                continue  # finished: its commits ended the lease on the coordinator
            elif unit.ending is not None:
                self.releasing.add(unit.lease_id)
                out.append(Release(unit.lease_id, unit.ending))
            else:
                kept.append(unit)
        self.units = kept
        # The running unit: plan it, or start its next run.
        if self.units:
            unit = self.units[0]
            if not unit.running and unit.ending is None and not unit.lease_over:
                if unit.runs is None:
                    unit.running = True
                    out.append(Plan(unit.lease_id))
                elif not unit.all_run and self.allowed and not self.stopping:
                    unit.running = True
                    out.append(Run(unit.lease_id, unit.next_run))
                    unit.next_run += 1
        # Ask for more work while there is room.
        if (
            self.registered
            and self.allowed
            and not self.stopping
            and not self.fetching
            and len(self.units) <= self.reserve
        ):
            self.fetching = True
            out.append(Fetch())
        if (
            self.stopping
            and not self.exited
            and not self.units
            and not self.releasing
            and not self.fetching
        ):
            self.exited = True
            out.append(Exit())
        return out

    def _register(self, delay_s: float) -> list[Instruction]:
        if self.registering:
            return []
        self.registering = True
        return [Register(delay_s)]

    def _unit(self, lease_id: str) -> _Unit:
        for unit in self.units:
            if unit.lease_id == lease_id:
                return unit
        raise KeyError(f"no unit holds lease {lease_id}")


_HANDLERS: dict[type, Callable[[AgentCore, Event], list[Instruction]]] = {
    Started: AgentCore._started,
    Registered: AgentCore._registered,
    RegistrationFailed: AgentCore._registration_failed,
    NotRegistered: AgentCore._not_registered,
    Reconnected: AgentCore._reconnected,
    VerdictChanged: AgentCore._verdict,
    Granted: AgentCore._granted,
    NoWork: AgentCore._no_work,
    FetchAgain: AgentCore._fetch_again,
    Planned: AgentCore._planned,
    PlanFailed: AgentCore._plan_failed,
    RunEnded: AgentCore._run_ended,
    RunFailed: AgentCore._run_failed,
    Sent: AgentCore._sent,
    ReleaseDone: AgentCore._release_done,
    Stop: AgentCore._stop,
}
