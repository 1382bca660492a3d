"""A simulated car: replays a recorded or hand-written state trace as a `StateSource`.

A `StateTrace` is an immutable, validated list of timed partial VSS updates (``TraceEvent``)
starting at a wall-clock time, stored as JSON Lines (a header line, then one event per line).
Loading is strict about structure (JSON, keys, times, known VSS paths) and names the file and
line of every problem, but deliberately does not range-check values: a trace may carry garbage
(a state of charge of 140) to show that the agent treats it as unreadable. `TraceSource` plays
a trace back on its own daemon thread, optionally compressed in time (``speed`` trace seconds
per real second) and looped, feeding each event through a `StateAssembler` exactly as a live
source would; its `now` is trace time, so the policy guard judges hours and departures in the
trace's clock. `TraceSource.push` applies an update at once on the caller's thread, which lets
tests and benchmarks time "state change → work stopped" precisely. `parked_state`,
`drive_away_events` and `StateTrace.parked_then_drive` build the common scenarios.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from idlefleet.agent.sources.base import StateListener, StateSource
from idlefleet.agent.vehicle_state import (
    GEAR_DRIVE,
    GEAR_PARK,
    SIGNALS,
    StateAssembler,
    StateReading,
)

__all__ = [
    "TRACE_FORMAT",
    "StateTrace",
    "TraceError",
    "TraceEvent",
    "TraceSource",
    "drive_away_events",
    "parked_state",
]

log = logging.getLogger(__name__)

TRACE_FORMAT = "idlefleet-state/1"
"""The ``trace`` value of a trace file's header line."""

DEFAULT_START = datetime(2026, 11, 22, 18, 0, tzinfo=UTC).timestamp()
"""Where built-in scenarios start (an evening, so "overnight" hours lie ahead)."""

_HEADER_KEYS = frozenset({"trace", "start"})
_EVENT_KEYS = frozenset({"t", "signals"})


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file, line and problem."""


# -- the trace -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEvent:
    """Partial update ``signals`` ({VSS path: raw value}) at ``t`` seconds after the start.

    Paths must be in `SIGNALS`; values are kept as given (the assembler judges them at replay).
    """

    t: float
    signals: Mapping[str, Any]

    def __post_init__(self) -> None:
        problem = _time_problem(self.t)
        if problem is None and not isinstance(self.signals, Mapping):
            problem = f"signals must be an object, got {self.signals!r}"
        if problem is None:
            problem = next(filter(None, map(_path_problem, self.signals)), None)
        if problem is not None:
            raise TraceError(problem)
        object.__setattr__(self, "t", float(self.t))
        object.__setattr__(self, "signals", MappingProxyType(dict(self.signals)))


@dataclass(frozen=True)
class StateTrace:
    """Events in time order (equal times allowed) from ``start`` (seconds since the epoch)."""

    start: float
    events: tuple[TraceEvent, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int | float):
            raise TraceError(f"start must be a number of epoch seconds, got {self.start!r}")
        if not _finite(self.start):
            raise TraceError(f"start must be finite, got {self.start!r}")
        events = tuple(self.events)
        for i, event in enumerate(events):
            if not isinstance(event, TraceEvent):
                raise TraceError(f"event {i}: expected a TraceEvent, got {event!r}")
            if i and event.t < events[i - 1].t:
                raise TraceError(f"event {i}: {_order_problem(event.t, events[i - 1].t)}")
        end = float(self.start) + (events[-1].t if events else 0.0)
        for label, when in (("start", float(self.start)), ("the last event", end)):
            try:
                datetime.fromtimestamp(when, tz=UTC)
            except (OverflowError, ValueError, OSError):
                # The guard reads the owner's local time of every instant it judges.
                raise TraceError(
                    f"{label} at {when:g} epoch seconds is not a date (years 1 to 9999)"
                ) from None
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "events", events)

    @property
    def duration(self) -> float:
        """The last event's ``t`` (0 for an empty trace)."""
        return self.events[-1].t if self.events else 0.0

    # -- building and reading ------------------------------------------------------------

    @classmethod
    def from_events(cls, start: float | datetime, events: Iterable[TraceEvent]) -> StateTrace:
        """A trace from ``start`` (epoch seconds, or an aware datetime) and sorted events."""
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise TraceError(f"start {start.isoformat()} has no UTC offset")
            start = start.timestamp()
        return cls(start, tuple(events))

    @classmethod
    def parked_then_drive(
        cls,
        park_s: float,
        *,
        start: float = DEFAULT_START,
        soc: float = 80.0,
        step: float = 1.0,
    ) -> StateTrace:
        """Parked and charging (`parked_state`) at t=0, then `drive_away_events` at ``park_s``."""
        return cls(start, (TraceEvent(0.0, parked_state(soc)), *drive_away_events(park_s, step)))

    @classmethod
    def load(cls, path: str | Path) -> StateTrace:
        """Read a JSON Lines trace file; `TraceError` names the file and line of a problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: cannot read trace: {exc}") from exc
        return cls.parse(text, name=str(path))

    @classmethod
    def parse(cls, text: str, name: str = "<string>") -> StateTrace:
        """Parse JSON Lines trace text; ``name`` prefixes error messages (``name:line: …``)."""
        start: float | None = None
        events: list[TraceEvent] = []
        last_line = 0
        for number, line in enumerate(text.splitlines(), start=1):
            last_line = number
            if not line.strip():
                continue
            try:
                obj = _json_object(line)
                if start is None:
                    start = _parse_header(obj)
                    continue
                event = _parse_event(obj)
                if events and event.t < events[-1].t:
                    raise TraceError(_order_problem(event.t, events[-1].t))
            except TraceError as exc:
                raise TraceError(f"{name}:{number}: {exc}") from None
            events.append(event)
        if start is None:
            raise TraceError(
                f"{name}:{max(last_line, 1)}: empty trace, expected a header line "
                f'{{"trace": "{TRACE_FORMAT}", "start": ...}}'
            )
        try:
            return cls(start, tuple(events))
        except TraceError as exc:  # the trace as a whole, e.g. an end past the year 9999
            raise TraceError(f"{name}: {exc}") from None

    def dumps(self) -> str:
        """The trace as JSON Lines text (what `parse` reads back to an equal trace)."""
        lines = [json.dumps({"trace": TRACE_FORMAT, "start": _format_start(self.start)})]
        lines += [json.dumps({"t": e.t, "signals": dict(e.signals)}) for e in self.events]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps(), encoding="utf-8")


def _time_problem(t: Any) -> str | None:
    if isinstance(t, bool) or not isinstance(t, int | float):
        return f"t must be a number of seconds, got {t!r}"
    if not _finite(t):
        return f"t must be finite, got {t!r}"
    if t < 0:
        return f"t must not be negative, got {t!r}"
    return None


def _finite(value: float) -> bool:
    """``math.isfinite``, also for an integer too large for a float (then False)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _order_problem(t: float, previous: float) -> str:
    return f"t {t:g} is before the previous event's t {previous:g} (events must be in order)"


def _path_problem(path: Any) -> str | None:
    if path in SIGNALS:
        return None
    if not isinstance(path, str):
        return f"signal names must be VSS paths (strings), got {path!r}"
    close = difflib.get_close_matches(path, list(SIGNALS), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown VSS signal {path!r}{hint}"


def _json_object(line: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # a set, not a count per key: a line may hold 100,000
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise TraceError(f"key {key!r} appears twice")
                seen.add(key)
        return obj

    try:
        obj = json.loads(line, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise TraceError(f"bad JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise TraceError("bad JSON: nested too deeply") from None
    except ValueError as exc:  # a number of more than 4,300 digits
        raise TraceError(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise TraceError(f"expected a JSON object, got {obj!r}")
    return obj


def _check_keys(obj: dict[str, Any], expected: frozenset[str], what: str) -> None:
    missing = sorted(expected - obj.keys())
    extra = sorted(obj.keys() - expected)
    if missing or extra:
        parts = [f"missing key {k!r}" for k in missing] + [f"unexpected key {k!r}" for k in extra]
        raise TraceError(f"{what}: {', '.join(parts)} (expected {', '.join(sorted(expected))})")


def _parse_header(obj: dict[str, Any]) -> float:
    if obj.get("trace") != TRACE_FORMAT:
        raise TraceError(
            f'header must start the trace with {{"trace": "{TRACE_FORMAT}", ...}}, '
            f"got trace={obj.get('trace')!r}"
        )
    _check_keys(obj, _HEADER_KEYS, "header")
    start = obj["start"]
    if isinstance(start, str):
        try:
            when = datetime.fromisoformat(start)
        except ValueError:
            raise TraceError(f"start {start!r} is not an ISO-8601 date and time") from None
        if when.tzinfo is None:
            raise TraceError(f"start {start!r} has no UTC offset (e.g. +01:00 or Z)")
        return when.timestamp()
    if isinstance(start, bool) or not isinstance(start, int | float) or not _finite(start):
        raise TraceError(f"start must be an ISO-8601 string or epoch seconds, got {start!r}")
    return float(start)


def _parse_event(obj: dict[str, Any]) -> TraceEvent:
    _check_keys(obj, _EVENT_KEYS, "event")
    return TraceEvent(obj["t"], obj["signals"])


def _format_start(start: float) -> str | float:
    """ISO-8601 in UTC when that is exact (microseconds), else the epoch seconds number."""
    when = datetime.fromtimestamp(start, tz=UTC)
    return when.isoformat() if when.timestamp() == start else start


# -- scenario builders -----------------------------------------------------------------------


def parked_state(
    soc: float = 80.0,
    charging: bool = True,
    *,
    plugged_in: bool = True,
    latitude: float = 48.1374,
    longitude: float = 11.5755,
) -> dict[str, Any]:
    """Every VSS signal of a car parked and locked up with nobody in it (plugged in by default)."""
    chip = "Vehicle.ControlUnit.Inference.Health.Resources"
    return {
        "Vehicle.Speed": 0.0,
        "Vehicle.IsMoving": False,
        "Vehicle.Powertrain.Transmission.SelectedGear": GEAR_PARK,
        "Vehicle.Powertrain.Transmission.IsParkLockEngaged": True,
        "Vehicle.LowVoltageSystemState": "OFF",
        "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current": soc,
        "Vehicle.Powertrain.TractionBattery.Charging.IsCharging": charging,
        "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition."
        "IsChargingCableConnected": plugged_in,
        "Vehicle.Powertrain.TractionBattery.Temperature.Average": 25.0,
        "Vehicle.CurrentLocation.Latitude": latitude,
        "Vehicle.CurrentLocation.Longitude": longitude,
        "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "EMPTY",
        "Vehicle.Connectivity.IsConnectivityAvailable": True,
        f"{chip}.Temperature": 50.0,
        f"{chip}.Power": 0.0,
        f"{chip}.Utilization": 0.0,
    }


def drive_away_events(at_t: float, step: float = 1.0) -> list[TraceEvent]:
    """A driver leaving, one stage every ``step`` seconds from ``at_t``.

    Unplug, sit down, ignition START then ON, select Drive, move off at 12 km/h.
    """
    stages: list[dict[str, Any]] = [
        {
            "Vehicle.Powertrain.TractionBattery.Charging.IsCharging": False,
            "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition."
            "IsChargingCableConnected": False,
        },
        {"Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "OCCUPIED"},
        {"Vehicle.LowVoltageSystemState": "START"},
        {"Vehicle.LowVoltageSystemState": "ON"},
        {
            "Vehicle.Powertrain.Transmission.SelectedGear": GEAR_DRIVE,
            "Vehicle.Powertrain.Transmission.IsParkLockEngaged": False,
        },
        {"Vehicle.Speed": 12.0, "Vehicle.IsMoving": True},
    ]
    return [TraceEvent(at_t + i * step, signals) for i, signals in enumerate(stages)]


# -- the source ------------------------------------------------------------------------------


@dataclass
class _Run:
    """Bookkeeping of one started source (kept apart so `now` needs no lock)."""

    started: float
    thread: threading.Thread = field(repr=False)


class TraceSource(StateSource):
    """Replays a `StateTrace` in (compressed) real time from a daemon thread."""

    def __init__(
        self,
        trace: StateTrace,
        speed: float = 1.0,
        loop: bool = False,
        *,
        loop_gap: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        """Play ``trace`` at ``speed`` trace seconds per real second.

        With ``loop`` the trace starts over ``loop_gap`` trace seconds after its last event
        (the assembler keeps its state across loops). ``clock`` is the real clock (seconds,
        monotonic); ``sleep(seconds)`` waits in that clock. By default the thread waits on an
        event that `stop` sets, so stop is immediate; a custom ``sleep`` (say, one advancing a
        fake clock) delays the thread's end until it returns, but never a delivery past `stop`.
        """
        for label, value in (("speed", speed), ("loop_gap", loop_gap)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{label} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be positive and finite, got {value!r}")
        self.trace = trace
        self.speed = float(speed)
        self.loop = loop
        self.loop_gap = float(loop_gap)
        self._clock = clock
        self._stopping = threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._stopping.wait
        self._assembler = StateAssembler()
        self._lock = threading.RLock()  # assembler + delivery; stop() waits on it
        self._listener: StateListener | None = None
        self._run: _Run | None = None

    def start(self, listener: StateListener) -> None:
        with self._lock:
            if self._run is not None or self._stopping.is_set():
                raise RuntimeError("TraceSource can be started only once")
            self._listener = listener
            thread = threading.Thread(target=self._replay, name="trace-source", daemon=True)
            self._run = _Run(self._clock(), thread)
            thread.start()

    def stop(self) -> None:
        """Stop at once; no listener call happens after this returns."""
        self._stopping.set()
        with self._lock:
            pass  # a delivery that had begun has now finished; later ones see _stopping
        run = self._run
        if run is not None and run.thread is not threading.current_thread():
            run.thread.join(timeout=2.0)
            if run.thread.is_alive():
                log.warning("trace source thread did not end within 2 s")

    def now(self) -> float:
        """Trace time: ``trace.start`` plus real time since `start` times ``speed``."""
        run = self._run
        if run is None:
            return self.trace.start
        return self.trace.start + (self._clock() - run.started) * self.speed

    def push(self, signals: Mapping[str, Any]) -> float:
        """Apply ``signals`` now and deliver the reading on the caller's thread.

        Returns the real clock (``clock()``) read just before the listener was called, for
        measuring reaction latency. RuntimeError if the source is not running.
        """
        delivered = self._deliver(signals)
        if delivered is None:
            raise RuntimeError("TraceSource.push needs a started, not stopped, source")
        return delivered

    # -- the source's thread -------------------------------------------------------------

    def _replay(self) -> None:
        run = self._run
        assert run is not None
        events = self.trace.events
        period = self.trace.duration + self.loop_gap
        cycle = 0
        while events:
            for event in events:
                due = run.started + (cycle * period + event.t) / self.speed
                if not self._wait_until(due):
                    return
                self._deliver(event.signals)
            if not self.loop:
                return  # the last state simply holds
            cycle += 1

    def _wait_until(self, due: float) -> bool:
        """Wait for the real time ``due``; False if stopped first."""
        while not self._stopping.is_set():
            delay = due - self._clock()
            if delay <= 0:
                return True
            self._sleep(delay)
        return False

    def _deliver(self, signals: Mapping[str, Any]) -> float | None:
        """Apply and deliver; the clock time of delivery, or None when not running."""
        with self._lock:
            listener = self._listener
            if listener is None or self._stopping.is_set():
                return None
            reading: StateReading = self._assembler.apply(signals, at=self.now())
            delivered = self._clock()
            try:
                listener(reading)
            except Exception:
                log.exception("state listener raised on a trace reading")
            return delivered
