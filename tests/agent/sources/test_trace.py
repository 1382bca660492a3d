"""StateTrace (load, dump, validation) and TraceSource (replay, time, loop, stop, push)."""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlefleet.agent.policy_guard import PolicyGuard
from idlefleet.agent.sources.trace import (
    DEFAULT_START,
    TRACE_FORMAT,
    StateTrace,
    TraceError,
    TraceEvent,
    TraceSource,
    drive_away_events,
    parked_state,
)
from idlefleet.agent.vehicle_state import (
    GEAR_DRIVE,
    SIGNALS,
    StateAssembler,
    StateReading,
    VehicleState,
)
from idlefleet.protocol.policy import OwnerPolicy
from tests.fuzzing import fuzz_settings
from tests.hostile import hostile, spoiled

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
SPEED = "Vehicle.Speed"
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
SEAT = "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus"
HEADER = json.dumps({"trace": TRACE_FORMAT, "start": "2026-11-22T18:00:00+01:00"})
WAIT = 5.0  # seconds: generous upper bound for anything that should happen at once


def event_line(t: Any, signals: dict[str, Any] | None = None) -> str:
    return json.dumps({"t": t, "signals": signals if signals is not None else {SPEED: 0.0}})


def collect(readings: queue.Queue[StateReading], n: int) -> list[StateReading]:
    return [readings.get(timeout=WAIT) for _ in range(n)]


@pytest.fixture
def readings() -> queue.Queue[StateReading]:
    return queue.Queue()


@pytest.fixture
def sources() -> Any:
    """Sources started by a test; stopped afterwards even if the test failed."""
    started: list[TraceSource] = []
    yield started
    for source in started:
        source.stop()


# -- the trace file --------------------------------------------------------------------------


def test_parse_reads_header_and_events() -> None:
    text = "\n".join([HEADER, "", event_line(0.0, {SOC: 80.0}), event_line(2, {SPEED: 5.0})])

    trace = StateTrace.parse(text)

    assert trace.start == datetime(2026, 11, 22, 17, 0, tzinfo=UTC).timestamp()
    assert trace.events == (TraceEvent(0.0, {SOC: 80.0}), TraceEvent(2.0, {SPEED: 5.0}))


def test_header_start_may_be_epoch_seconds() -> None:
    text = json.dumps({"trace": TRACE_FORMAT, "start": 1_800_000_000.5}) + "\n"

    trace = StateTrace.parse(text)

    assert trace.start == 1_800_000_000.5
    assert trace.events == ()


@pytest.mark.parametrize("start", [DEFAULT_START, 1_800_000_000.123456789])
def test_save_and_load_round_trip(tmp_path: Path, start: float) -> None:
    trace = StateTrace.parked_then_drive(600.0, start=start, soc=140.0)  # garbage survives too
    path = tmp_path / "drive.jsonl"

    trace.save(path)
    loaded = StateTrace.load(path)

    assert loaded == trace
    assert loaded.dumps() == trace.dumps()


@pytest.mark.parametrize(
    ("lines", "line", "problem"),
    [
        ([], 1, "empty trace"),
        ([HEADER, '{"t": 0.0, "signals": {'], 2, "bad JSON"),
        ([json.dumps({"trace": "idlefleet-state/2", "start": 0})], 1, "'idlefleet-state/2'"),
        ([event_line(0.0)], 1, "header must start the trace"),
        ([json.dumps({"trace": TRACE_FORMAT})], 1, "missing key 'start'"),
        ([json.dumps({"trace": TRACE_FORMAT, "start": 0, "car": "x"})], 1, "unexpected key 'car'"),
        ([json.dumps({"trace": TRACE_FORMAT, "start": "2026-11-22T18:00"})], 1, "no UTC offset"),
        ([json.dumps({"trace": TRACE_FORMAT, "start": "tonight"})], 1, "not an ISO-8601"),
        ([HEADER, '["t", 0]'], 2, "expected a JSON object"),
        ([HEADER, json.dumps({"t": 0.0})], 2, "missing key 'signals'"),
        ([HEADER, json.dumps({"t": 0, "signals": {}, "dt": 1})], 2, "unexpected key 'dt'"),
        ([HEADER, '{"t": 0, "t": 1, "signals": {}}'], 2, "key 't' appears twice"),
        ([HEADER, event_line(-1.0)], 2, "t must not be negative"),
        ([HEADER, '{"t": NaN, "signals": {}}'], 2, "t must be finite"),
        ([HEADER, '{"t": Infinity, "signals": {}}'], 2, "t must be finite"),
        # Each of these three raised something else than TraceError before:
        ([HEADER, '{"t": 1' + "0" * 400 + ', "signals": {}}'], 2, "t must be finite"),
        ([HEADER, '{"t": 1' + "0" * 5000 + ', "signals": {}}'], 2, "bad JSON"),
        ([HEADER, "[" * 100_000 + "]" * 100_000], 2, "nested too deeply"),
        ([json.dumps({"trace": TRACE_FORMAT, "start": 10**400})], 1, "epoch seconds"),
        ([HEADER, event_line("5")], 2, "t must be a number"),
        ([HEADER, event_line(True)], 2, "t must be a number"),
        ([HEADER, event_line(0, [1])], 2, "signals must be an object"),  # type: ignore[arg-type]
        ([HEADER, event_line(5.0), "", event_line(3.0)], 4, "t 3 is before the previous"),
        ([HEADER, event_line(0.0, {"Vehicle.Body.Horn.IsActive": True})], 2, "unknown VSS"),
    ],
)
def test_invalid_trace_names_file_line_and_problem(
    tmp_path: Path, lines: list[str], line: int, problem: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")

    with pytest.raises(TraceError) as caught:
        StateTrace.load(path)

    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    "lines",
    [
        [json.dumps({"trace": TRACE_FORMAT, "start": 1e300})],
        [HEADER, event_line(1e300)],
    ],
    ids=["start", "end"],
)
def test_a_trace_must_lie_within_the_calendar(lines: list[str]) -> None:
    # The guard reads the owner's local time of each instant: past the year 9999 it raised.
    with pytest.raises(TraceError) as caught:
        StateTrace.parse("\n".join(lines), name="far.jsonl")

    assert str(caught.value).startswith("far.jsonl: ") and "years 1 to 9999" in str(caught.value)


def test_a_line_of_many_keys_is_checked_for_repeats_in_linear_time() -> None:
    keys = ", ".join(f'"k{i}": 0' for i in range(200_000))  # counting each key was quadratic

    with pytest.raises(TraceError) as caught:
        StateTrace.parse("\n".join([HEADER, "{" + keys + ', "k7": 1}']))

    assert "key 'k7' appears twice" in str(caught.value)


def test_unknown_path_suggests_the_closest_known_one() -> None:
    text = "\n".join([HEADER, event_line(0.0, {"Vehicle.Sped": 3.0})])

    with pytest.raises(TraceError) as caught:
        StateTrace.parse(text, name="typo.jsonl")

    assert str(caught.value) == (
        "typo.jsonl:2: unknown VSS signal 'Vehicle.Sped'; did you mean 'Vehicle.Speed'?"
    )


def test_unknown_path_without_a_near_one_suggests_nothing() -> None:
    with pytest.raises(TraceError) as caught:
        StateTrace.parse("\n".join([HEADER, event_line(0.0, {"Vehicle.Body.Horn": True})]))

    assert "did you mean" not in str(caught.value)


def test_values_are_not_range_checked_at_load() -> None:
    text = "\n".join([HEADER, event_line(0.0, {SOC: 140.0, GEAR: "drive"})])

    trace = StateTrace.parse(text)

    assert trace.events[0].signals == {SOC: 140.0, GEAR: "drive"}


def test_from_events_rejects_events_out_of_order() -> None:
    events = [TraceEvent(5.0, {SPEED: 0.0}), TraceEvent(1.0, {SPEED: 1.0})]

    with pytest.raises(TraceError, match=r"event 1: t 1 is before the previous event's t 5"):
        StateTrace.from_events(DEFAULT_START, events)


def test_from_events_rejects_a_naive_datetime() -> None:
    with pytest.raises(TraceError, match="no UTC offset"):
        StateTrace.from_events(datetime(2026, 11, 22, 18, 0), [])


def test_events_are_immutable_copies() -> None:
    signals: dict[str, Any] = {SPEED: 0.0}
    event = TraceEvent(0, signals)

    signals[SPEED] = 99.0

    assert event.signals == {SPEED: 0.0}
    assert isinstance(event.t, float)
    mutable: Any = event.signals
    with pytest.raises(TypeError):
        mutable[SPEED] = 1.0


# -- scenario builders -----------------------------------------------------------------------


def test_parked_state_is_a_full_valid_parked_unoccupied_state() -> None:
    signals = parked_state(soc=55.0)

    state = VehicleState.from_signals(signals)

    assert set(signals) == set(SIGNALS)
    assert state.parked
    assert state.soc_percent == 55.0
    assert (state.is_charging, state.cable_connected) == (True, True)
    assert (state.driver_seat, state.low_voltage_state) == ("EMPTY", "OFF")


def test_parked_then_drive_ends_moving_in_drive_with_a_driver() -> None:
    trace = StateTrace.parked_then_drive(3600.0, step=2.0)

    state = VehicleState()
    for event in trace.events:
        state = state.with_signals(event.signals)

    assert trace.events[1].t == 3600.0
    assert trace.duration == 3600.0 + 2.0 * (len(drive_away_events(0.0)) - 1)
    assert (state.selected_gear, state.is_moving, state.speed_kmh) == (GEAR_DRIVE, True, 12.0)
    assert (state.driver_seat, state.low_voltage_state) == ("OCCUPIED", "ON")
    seen = [e.signals.get("Vehicle.LowVoltageSystemState") for e in trace.events]
    assert [s for s in seen if s] == ["OFF", "START", "ON"]


# -- replay ----------------------------------------------------------------------------------


def test_replay_delivers_every_event_in_order_with_merged_state(
    readings: queue.Queue[StateReading], sources: list[TraceSource]
) -> None:
    trace = StateTrace.parked_then_drive(1.0, step=0.5)
    source = TraceSource(trace, speed=1000.0)
    sources.append(source)

    source.start(readings.put)
    got = collect(readings, len(trace.events))

    expected = VehicleState()
    for reading, event in zip(got, trace.events, strict=True):
        expected = expected.with_signals(event.signals)
        assert reading.state == expected
        assert reading.error is None
    assert got[-1].state.soc_percent == 80.0  # from the first event, kept through the rest
    assert [r.at for r in got] == sorted(r.at for r in got)
    assert readings.empty()


def test_events_with_the_same_time_arrive_in_order(
    readings: queue.Queue[StateReading], sources: list[TraceSource]
) -> None:
    events = [TraceEvent(0.0, {SPEED: float(i)}) for i in range(5)]
    source = TraceSource(StateTrace(DEFAULT_START, tuple(events)), speed=1000.0)
    sources.append(source)

    source.start(readings.put)

    assert [r.state.speed_kmh for r in collect(readings, 5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_garbage_value_is_an_error_until_a_valid_value_replaces_it(
    readings: queue.Queue[StateReading], sources: list[TraceSource]
) -> None:
    events = (
        TraceEvent(0.0, parked_state(soc=140.0)),
        TraceEvent(0.5, {SPEED: 0.0}),
        TraceEvent(1.0, {SOC: 75.0}),
    )
    source = TraceSource(StateTrace(DEFAULT_START, events), speed=1000.0)
    sources.append(source)

    source.start(readings.put)
    garbage, still, fixed = collect(readings, 3)

    assert garbage.error is not None and SOC in garbage.error and "140" in garbage.error
    assert garbage.state.soc_percent is None
    assert still.error == garbage.error
    assert fixed.error is None
    assert fixed.state.soc_percent == 75.0


# -- time ------------------------------------------------------------------------------------


def test_now_is_trace_start_before_start() -> None:
    source = TraceSource(StateTrace(DEFAULT_START), speed=60.0)

    assert source.now() == DEFAULT_START


def test_now_advances_at_speed_times_real_time(sources: list[TraceSource]) -> None:
    source = TraceSource(StateTrace(DEFAULT_START), speed=60.0)
    sources.append(source)
    source.start(lambda reading: None)

    before_a, n0, before_b = time.monotonic(), source.now(), time.monotonic()
    threading.Event().wait(0.2)  # let real time pass; nothing to synchronise with
    after_a, n1, after_b = time.monotonic(), source.now(), time.monotonic()

    slack = 1e-6
    assert DEFAULT_START <= n0 <= DEFAULT_START + (before_b - before_a) * 60.0 + WAIT * 60.0
    assert (after_a - before_b) * 60.0 - slack <= n1 - n0 <= (after_b - before_a) * 60.0 + slack
    assert n1 - n0 >= 0.2 * 60.0 - slack


def test_loop_replays_with_trace_time_increasing_across_loops() -> None:
    # A fake clock that the source's sleep advances: the schedule is then exact.
    fake_now = [100.0]

    def sleep(seconds: float) -> None:
        fake_now[0] += seconds

    events = (TraceEvent(0.0, {SPEED: 0.0}), TraceEvent(2.0, {SPEED: 2.0}), TraceEvent(5.0, {}))
    source = TraceSource(
        StateTrace(DEFAULT_START, events),
        speed=2.0,
        loop=True,
        loop_gap=1.0,
        clock=lambda: fake_now[0],
        sleep=sleep,
    )
    got: list[StateReading] = []
    done = threading.Event()

    def listener(reading: StateReading) -> None:
        got.append(reading)
        if len(got) == 9:
            source.stop()  # from the source's own thread: must not deadlock
            done.set()

    source.start(listener)

    assert done.wait(WAIT)
    assert [r.at - DEFAULT_START for r in got] == [0, 2, 5, 6, 8, 11, 12, 14, 17]
    assert [r.state.speed_kmh for r in got] == [0.0, 2.0, 2.0] * 3
    assert len(got) == 9  # nothing after stop()


def test_loop_replays_in_real_time(
    readings: queue.Queue[StateReading], sources: list[TraceSource]
) -> None:
    events = (TraceEvent(0.0, {SPEED: 1.0}), TraceEvent(0.5, {SPEED: 2.0}))
    source = TraceSource(StateTrace(DEFAULT_START, events), speed=100.0, loop=True, loop_gap=0.5)
    sources.append(source)

    source.start(readings.put)
    got = collect(readings, 6)

    assert [r.state.speed_kmh for r in got] == [1.0, 2.0] * 3
    times = [r.at for r in got]
    assert times == sorted(times)
    assert times[4] - DEFAULT_START >= 2.0  # due after two full periods of 1 trace second
    assert source.now() >= times[-1]


# -- stop ------------------------------------------------------------------------------------


def test_stop_is_prompt_while_the_next_event_is_an_hour_away(
    readings: queue.Queue[StateReading],
) -> None:
    source = TraceSource(StateTrace.parked_then_drive(3600.0), speed=1.0)
    source.start(readings.put)
    collect(readings, 1)  # parked; the drive-away is an hour ahead

    began = time.monotonic()
    source.stop()
    took = time.monotonic() - began

    assert took < 1.0
    assert not any(t.name == "trace-source" and t.is_alive() for t in threading.enumerate())
    assert readings.empty()


def test_no_listener_call_after_stop_returns() -> None:
    # A trace compressed so far that the thread delivers back to back until stopped.
    events = (TraceEvent(0.0, {SPEED: 0.0}), TraceEvent(1.0, {SPEED: 1.0}))
    source = TraceSource(StateTrace(DEFAULT_START, events), speed=1e6, loop=True)
    stopped = threading.Event()
    late: list[StateReading] = []
    busy = threading.Event()
    count = [0]

    def listener(reading: StateReading) -> None:
        if stopped.is_set():
            late.append(reading)
        count[0] += 1
        if count[0] >= 50:
            busy.set()

    source.start(listener)
    assert busy.wait(WAIT)
    source.stop()
    stopped.set()
    threading.Event().wait(0.05)  # give a wrongly running thread time to deliver

    assert late == []
    with pytest.raises(RuntimeError):
        source.push({SPEED: 3.0})


def test_start_twice_is_refused(sources: list[TraceSource]) -> None:
    source = TraceSource(StateTrace(DEFAULT_START))
    sources.append(source)
    source.start(lambda reading: None)

    with pytest.raises(RuntimeError):
        source.start(lambda reading: None)


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan, math.inf, True])
def test_invalid_speed_is_refused(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        TraceSource(StateTrace(DEFAULT_START), speed=speed)


# -- push and faulty listeners ---------------------------------------------------------------


def test_push_delivers_on_the_callers_thread_and_returns_the_time(
    readings: queue.Queue[StateReading], sources: list[TraceSource]
) -> None:
    threads: list[int] = []

    def listener(reading: StateReading) -> None:
        threads.append(threading.get_ident())
        readings.put(reading)

    source = TraceSource(StateTrace.parked_then_drive(3600.0), speed=1.0)
    sources.append(source)
    source.start(listener)
    collect(readings, 1)  # the parked state, from the source's thread

    before = time.monotonic()
    delivered = source.push({GEAR: GEAR_DRIVE})
    after = time.monotonic()

    pushed = readings.get_nowait()  # already there: delivered before push returned
    assert before <= delivered <= after
    assert threads[-1] == threading.get_ident() != threads[0]
    assert pushed.state.selected_gear == GEAR_DRIVE
    assert pushed.state.soc_percent == 80.0  # merged with the trace's state
    assert pushed.error is None


def test_push_before_start_is_refused() -> None:
    source = TraceSource(StateTrace(DEFAULT_START))

    with pytest.raises(RuntimeError):
        source.push({SPEED: 0.0})


def test_a_raising_listener_does_not_kill_the_thread(
    readings: queue.Queue[StateReading],
    sources: list[TraceSource],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def listener(reading: StateReading) -> None:
        readings.put(reading)
        raise RuntimeError("listener bug")

    events = tuple(TraceEvent(i * 0.5, {SPEED: float(i)}) for i in range(3))
    source = TraceSource(StateTrace(DEFAULT_START, events), speed=1000.0)
    sources.append(source)

    with caplog.at_level(logging.ERROR, logger="idlefleet.agent.sources.trace"):
        source.start(listener)
        got = collect(readings, 3)
        source.push({SPEED: 9.0})  # the caller is protected too

    assert [r.state.speed_kmh for r in got] == [0.0, 1.0, 2.0]
    assert readings.get_nowait().state.speed_kmh == 9.0
    assert sum("listener bug" in (r.exc_text or "") for r in caplog.records) == 4


# -- hostile trace files (hypothesis) -------------------------------------------------------------


@st.composite
def trace_bytes(draw: st.DrawFn) -> bytes:
    """A trace file as a person or a tool might get it wrong: its header and events each intact
    or broken (fields, values, bytes), with hostile signal values."""
    header = {"trace": TRACE_FORMAT, "start": "2026-11-22T18:00:00+01:00"}
    lines = [draw(spoiled(header))]
    paths = sorted(SIGNALS)
    for i in range(draw(st.integers(0, 4))):
        picked = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True))
        state = parked_state()
        signals = {p: draw(st.sampled_from([state[p], None]) | hostile) for p in picked}
        lines.append(draw(spoiled({"t": float(i), "signals": signals})))
    return b"\n".join(lines)


@pytest.mark.fuzz
@fuzz_settings(100)
@given(content=trace_bytes())
def test_any_trace_file_loads_or_names_its_problem_and_replays_without_raising(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(content)

    try:
        trace = StateTrace.load(path)
    except TraceError as problem:
        assert str(problem).startswith(str(path)) and len(str(problem)) > len(str(path)) + 2
        return
    # Values are judged at replay: a broken one makes the reading unreadable, never raises.
    assembler = StateAssembler()
    guard = PolicyGuard(OwnerPolicy(opted_in=True, timezone="Pacific/Kiritimati"))
    for event in trace.events:
        reading = assembler.apply(event.signals, at=trace.start + event.t)
        verdict = guard.observe(reading, trace.start + event.t)
        assert reading.readable or not verdict.allowed
