"""The compute gate: the one place that lets a model run start, and that stops it.

Every model run in the agent (a micro-batch of a leased unit, an online request) asks the gate
for a `Step` first and hands the step's ONNX Runtime `RunOptions` to the run. State readings
arrive from the state source's own thread; the gate re-judges the car with the `PolicyGuard`
at once and, when the verdict turns to "stop", sets ``terminate`` on every running step before
it returns — on the source's thread, without waiting for the agent's event loop. ONNX Runtime
checks that flag between graph nodes, so the run ends within one node's time.

Because `begin` and the readings are serialised by one lock, no step can start after a
forbidding reading has been seen, and every step running when it arrives is told to stop.
Before a step starts, the gate also checks that the step's expected energy keeps the car above
its state-of-charge floor and within the daily energy cap, so compute never crosses either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnxruntime as ort

from idlefleet.agent.energy import JOULES_PER_KWH, EnergyMeter
from idlefleet.agent.figures import Figures
from idlefleet.agent.policy_guard import PolicyGuard, Verdict, blockers
from idlefleet.agent.vehicle_state import StateReading
from idlefleet.protocol.policy import OwnerPolicy

log = logging.getLogger(__name__)

__all__ = ["ComputeGate", "Step"]


@dataclass(eq=False)  # hashed by identity: the gate keeps running steps in a set
class Step:
    """One permitted model run: pass ``options`` to ONNX Runtime, then `ComputeGate.end` it."""

    options: ort.RunOptions
    lease_id: str | None
    started: float
    stopped_at: float | None = None
    """Time (the gate's timer) at which the gate told this step to stop (None if it did not)."""

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


class ComputeGate:
    """Thread-safe: readings come from the source thread, steps from compute threads."""

    def __init__(
        self,
        guard: PolicyGuard,
        clock: Callable[[], float],
        *,
        rated_power_w: float,
        battery_kwh: float = 75.0,
        meter: EnergyMeter | None = None,
        on_change: Callable[[Verdict], None] | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        if rated_power_w <= 0 or battery_kwh <= 0:
            raise ValueError("rated_power_w and battery_kwh must be positive")
        self._guard = guard
        self._clock = clock
        self.rated_power_w = rated_power_w
        self.battery_kwh = battery_kwh
        self.meter = meter or EnergyMeter()
        self.figures = Figures()
        """Runs, compute, energy, preemptions and stop times since the last heartbeat."""
        self._on_change = on_change
        self._timer = timer
        self._lock = threading.Lock()
        self._reading: StateReading | None = None
        self._verdict = Verdict(False, ("state_unreadable",), "no reading from the car yet")
        self._running: set[Step] = set()
        self._last_step_s = 1.0
        self.stop_decided_at: float | None = None
        """Timer time of the last allowed → stopped decision (for measurements)."""

    # -- inputs ------------------------------------------------------------------------------
    def on_reading(self, reading: StateReading) -> Verdict:
        """A new reading from the car (called on the source's thread)."""
        with self._lock:
            self._reading = reading
            return self._judge()

    def tick(self) -> Verdict:
        """Re-judge with the current time (hours, departure, the hysteresis wait)."""
        with self._lock:
            return self._judge()

    def set_policy(self, policy: OwnerPolicy) -> Verdict:
        """The owner changed the policy: it applies from this instant (opt-out stops at once)."""
        with self._lock:
            self._guard.policy = policy
            return self._judge()

    @property
    def policy(self) -> OwnerPolicy:
        return self._guard.policy

    @property
    def verdict(self) -> Verdict:
        return self._verdict

    @property
    def reading(self) -> StateReading | None:
        return self._reading

    # -- steps -------------------------------------------------------------------------------
    def begin(self, lease_id: str | None = None) -> Step | None:
        """A permit for one model run, or None if the car may not compute now."""
        with self._lock:
            if not self._judge().allowed or self._step_would_cross_a_limit():
                return None
            step = Step(ort.RunOptions(), lease_id, self._timer())
            self._running.add(step)
            return step

    def end(self, step: Step) -> float:
        """The run is over (finished or stopped): meter its energy. Returns joules."""
        ended = self._timer()
        seconds = ended - step.started
        with self._lock:
            self._running.discard(step)
            power = self._power_w()
            day = self._guard.policy.local(self._clock()).date()
            if not step.stopped:
                self._last_step_s = seconds
        joules = power * seconds
        self.meter.record(joules, day, step.lease_id)
        stop_s = None if step.stopped_at is None else ended - step.stopped_at
        self.figures.ran(seconds, joules, stop_s)
        return joules

    # -- internals (lock held) ---------------------------------------------------------------
    def _energy_today_kwh(self) -> float:
        return self.meter.today_kwh(self._guard.policy.local(self._clock()).date())

    def _judge(self) -> Verdict:
        before = self._verdict
        verdict = self._guard.observe(self._reading, self._clock(), self._energy_today_kwh())
        self._verdict = verdict
        if before.allowed and not verdict.allowed:
            now = self._timer()
            self.stop_decided_at = now
            if self._running:
                self.figures.preempted()
            for step in self._running:
                step.options.terminate = True
                step.stopped_at = now
        changed = (verdict.allowed, verdict.reasons) != (before.allowed, before.reasons)
        if changed and self._on_change is not None:
            try:
                self._on_change(verdict)
            except Exception:  # a listener must never break the stop path
                log.exception("verdict listener failed")
        return verdict

    def _power_w(self) -> float:
        reported = self._reading.state.chip_power_w if self._reading else None
        return reported if reported else self.rated_power_w

    def _step_would_cross_a_limit(self) -> bool:
        """Whether the next step, at the last step's length, would cross the floor or the cap."""
        step_kwh = self._power_w() * self._last_step_s / JOULES_PER_KWH
        policy = self._guard.policy
        projected = blockers(
            self._reading, policy, self._clock(), self._energy_today_kwh() + step_kwh
        )
        if projected:
            return True
        soc = self._reading.state.soc_percent if self._reading else None
        if soc is None:
            return True
        return soc - 100.0 * step_kwh / self.battery_kwh <= policy.soc_floor_percent
