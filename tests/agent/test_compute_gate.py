"""The compute gate over random state traces: no step runs while the guard forbids it.

The property test is a discrete-event simulation on a fake clock. Readings from a random trace
and attempts to start model runs ("steps") of random length interleave; a running step ends
early exactly when the gate sets its ``terminate`` flag (as ONNX Runtime does). The checks
use only the trace and the pure `blockers` function, not the guard's internal state.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.energy import JOULES_PER_KWH
from idlefleet.agent.policy_guard import PolicyGuard, blockers
from idlefleet.agent.sources.trace import parked_state
from idlefleet.agent.vehicle_state import StateAssembler, StateReading
from idlefleet.protocol.policy import OwnerPolicy

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()
POWER_W = 1000.0
SEAT = "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus"


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


# Signal values chosen so that both "allowed" and each kind of "forbidden" come up often.
signal_changes = st.dictionaries(
    st.sampled_from(
        [
            "Vehicle.Powertrain.Transmission.SelectedGear",
            "Vehicle.Powertrain.Transmission.IsParkLockEngaged",
            "Vehicle.Speed",
            "Vehicle.IsMoving",
            "Vehicle.LowVoltageSystemState",
            SEAT,
            "Vehicle.Powertrain.TractionBattery.Charging.IsCharging",
            "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
            "Vehicle.Powertrain.TractionBattery.Temperature.Average",
            "Vehicle.ControlUnit.Inference.Health.Resources.Temperature",
        ]
    ),
    st.none()
    | st.booleans()
    | st.sampled_from([0, 126, 127, 0.0, 5.0, 25.0, 40.0, 60.0, 95.0, 140.0, "OFF", "START"])
    | st.sampled_from(["ON", "EMPTY", "OCCUPIED", "UNKNOW", "garbage"]),
    max_size=3,
)
# Typical real stops: the driver gets in, shifts out of Park, starts the car, battery gets low.
stop_changes = st.sampled_from(
    [
        {SEAT: "OCCUPIED"},
        {
            "Vehicle.Powertrain.Transmission.SelectedGear": 127,
            "Vehicle.Powertrain.Transmission.IsParkLockEngaged": False,
        },
        {"Vehicle.LowVoltageSystemState": "START"},
        {"Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 10.0},
    ]
)
step = st.tuples(st.just("step"), st.floats(0, 30), st.floats(0.01, 40))
revert = st.tuples(st.just("revert"), st.floats(0, 30), st.just({}))
events = st.lists(
    st.one_of(
        st.tuples(st.just("reading"), st.floats(0, 30), signal_changes),
        st.tuples(st.just("reading"), st.floats(0, 30), stop_changes),
        step,
        step,
        revert,
        st.tuples(st.just("tick"), st.floats(0, 30), st.just({})),
    ),
    min_size=1,
    max_size=60,
)
policies = st.builds(
    OwnerPolicy,
    opted_in=st.sampled_from([True, True, True, False]),
    charging_only=st.booleans(),
    soc_floor_percent=st.sampled_from([0.0, 20.0, 50.0]),
    allowed_hours=st.sampled_from([[], [], ["12:00-12:10"], ["12:05-11:00"]]),
    daily_energy_cap_kwh=st.sampled_from([None, 0.005, 0.02, 10.0]),
)


@settings(max_examples=1000, deadline=None)
@given(events=events, policy=policies, resume=st.sampled_from([0.0, 0.0, 5.0, 60.0]))
def test_no_step_runs_while_the_guard_forbids_and_every_forbidden_interval_stops_work(
    events: list[tuple[str, float, Any]], policy: OwnerPolicy, resume: float
) -> None:
    clock = FakeClock()
    gate = ComputeGate(
        PolicyGuard(policy, resume), clock, rated_power_w=POWER_W, battery_kwh=75, timer=clock
    )
    assembler = StateAssembler()
    readings: list[tuple[float, StateReading]] = []
    energy_j = 0.0  # counted here independently of the gate's meter
    running: tuple[Any, float, float] | None = None  # (step, started, planned end)
    spans: list[tuple[float, float, bool]] = []  # (start, end, stopped early)

    def deliver(changes: dict[str, Any]) -> None:
        r = assembler.apply(changes, clock.now)
        readings.append((clock.now, r))
        gate.on_reading(r)

    def finish_running(until: float) -> None:
        nonlocal running, energy_j
        if running is None:
            return
        step, started, planned = running
        if planned <= until:
            clock.now = planned
            gate.end(step)
            energy_j += POWER_W * (planned - started)
            spans.append((started, planned, False))
            running = None

    deliver(parked_state())
    for kind, gap, arg in events:
        target = clock.now + gap
        finish_running(target)
        clock.now = max(clock.now, target)
        if kind in ("reading", "revert", "tick"):
            if kind == "tick":  # the agent re-judges every 0.2 s: hours pass without readings
                gate.tick()
                readings.append((clock.now, readings[-1][1]))
            else:
                deliver(arg if kind == "reading" else parked_state())
            if running is not None and running[0].stopped:
                step, started, _ = running
                assert step.options.terminate  # what stops the ONNX Runtime run
                gate.end(step)
                energy_j += POWER_W * (clock.now - started)
                spans.append((started, clock.now, True))
                running = None
        elif running is None:
            step = gate.begin()
            if step is not None:
                _check_step_may_start(readings, policy, clock.now, resume, energy_j)
                running = (step, clock.now, clock.now + arg)
    finish_running(float("inf"))
    event(f"steps: {'some' if spans else 'none'}, stopped early: {any(x for *_, x in spans)}")

    # Every step ran only between readings that allowed it: a reading that forbids compute
    # ended any step running when it arrived, at that very moment; and a step was stopped
    # only by a reading that forbids compute.
    for start, end, stopped in spans:
        for at, r in readings:
            if start < at < end:
                assert not blockers(r, policy, at, _energy_before(spans, at))
        if stopped:
            assert any(
                at == end and blockers(r, policy, at, _energy_before(spans, at))
                for at, r in readings
            )
    # The daily cap is kept to within the one step that crossed it.
    cap = policy.daily_energy_cap_kwh
    if cap is not None and spans:
        longest = max(e - s for s, e, _ in spans)
        assert energy_j <= cap * JOULES_PER_KWH + POWER_W * longest + 1e-6


def _energy_before(spans: list[tuple[float, float, bool]], at: float) -> float:
    return sum(POWER_W * (e - s) for s, e, _ in spans if e <= at) / JOULES_PER_KWH


def _check_step_may_start(
    readings: list[tuple[float, StateReading]],
    policy: OwnerPolicy,
    now: float,
    resume: float,
    energy_j: float,
) -> None:
    """At a step's start the current reading is clear, and so was every reading of the last
    ``resume`` seconds (the hysteresis), judged by the pure function alone."""
    current = readings[-1][1]
    assert not blockers(current, policy, now, energy_j / JOULES_PER_KWH)
    for at, r in readings:
        if now - resume < at <= now:
            assert not blockers(r, policy, at)
    assert readings[0][0] <= now - resume or resume == 0


def test_a_reading_stops_a_running_step_on_the_readers_thread() -> None:
    # Real threads: a step running on one thread is told to stop by a reading on another,
    # before on_reading returns.
    gate = ComputeGate(PolicyGuard(OwnerPolicy(opted_in=True), 0), time.time, rated_power_w=65.0)
    gate.on_reading(StateAssembler().apply(parked_state(), time.time()))
    step = gate.begin("lease-1")
    assert step is not None
    stopped = threading.Event()

    def drive_off() -> None:
        gate.on_reading(StateAssembler().apply({**parked_state(), SEAT: "OCCUPIED"}, time.time()))
        stopped.set()

    threading.Thread(target=drive_off).start()
    assert stopped.wait(5)
    assert step.options.terminate and step.stopped
    assert gate.begin("lease-1") is None  # and nothing new starts
    assert gate.end(step) > 0
    assert gate.meter.take_lease("lease-1") > 0


def test_a_step_that_would_cross_the_soc_floor_does_not_start() -> None:
    policy = OwnerPolicy(opted_in=True, soc_floor_percent=50.0)
    clock = FakeClock()
    gate = ComputeGate(
        PolicyGuard(policy, 0), clock, rated_power_w=1000, battery_kwh=1, timer=clock
    )
    # 50.02 % of a 1 kWh battery leaves 0.2 Wh above the floor; a 1 s step at 1 kW takes 0.28 Wh.
    gate.on_reading(
        StateAssembler().apply(
            {**parked_state(), "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 50.02},
            clock.now,
        )
    )
    assert gate.verdict.allowed
    assert gate.begin() is None
    gate.on_reading(
        StateAssembler().apply(
            {**parked_state(), "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": 50.1},
            clock.now,
        )
    )
    assert gate.begin() is not None


def test_opting_out_stops_a_running_step() -> None:
    clock = FakeClock()
    gate = ComputeGate(
        PolicyGuard(OwnerPolicy(opted_in=True), 0), clock, rated_power_w=65, timer=clock
    )
    gate.on_reading(StateAssembler().apply(parked_state(), clock.now))
    step = gate.begin()
    assert step is not None
    verdict = gate.set_policy(OwnerPolicy(opted_in=False))
    assert verdict.reasons == ("opted_out",)
    assert step.options.terminate


def test_figures_count_runs_energy_a_preemption_and_how_long_the_stop_took() -> None:
    clock = FakeClock()
    gate = ComputeGate(
        PolicyGuard(OwnerPolicy(opted_in=True), 0), clock, rated_power_w=POWER_W, timer=clock
    )
    gate.on_reading(StateAssembler().apply(parked_state(), clock.now))
    finished = gate.begin("lease-1")
    assert finished is not None
    clock.now += 2.0
    gate.end(finished)
    first, second = gate.begin("lease-1"), gate.begin("lease-1")
    assert first is not None and second is not None
    clock.now += 1.0
    gate.on_reading(StateAssembler().apply({**parked_state(), SEAT: "OCCUPIED"}, clock.now))
    clock.now += 0.004  # the first run notices the stop 4 ms later, the second 9 ms later
    gate.end(first)
    clock.now += 0.005
    gate.end(second)

    figures = gate.figures.take()

    assert figures is not None
    assert figures.runs == 3 and figures.preemptions == 1  # one stop, two runs told
    assert figures.compute_s == pytest.approx(2.0 + 1.004 + 1.009, abs=1e-6)
    assert figures.energy_j == pytest.approx(POWER_W * figures.compute_s)
    assert figures.stop_s == pytest.approx([0.004, 0.009], abs=1e-6)
    # A stop decision with nothing running is no preemption.
    gate.on_reading(StateAssembler().apply(parked_state(), clock.now))
    gate.on_reading(StateAssembler().apply({**parked_state(), SEAT: "OCCUPIED"}, clock.now))
    assert gate.figures.take() is None
