"""KuksaSource against an in-process gRPC databroker built from kuksa-client's own stubs.

The fake broker implements what the client uses: ``kuksa.val.v1.VAL/GetServerInfo`` (the
connection check) and ``kuksa.val.v2.VAL/Subscribe``, which, like the real databroker, first
sends the current value of every subscribed path and then each published change.
"""

from __future__ import annotations

import importlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import replace
from typing import Any

import pytest

pytest.importorskip("kuksa_client")

import grpc
from kuksa.val.v1 import val_pb2 as val_v1
from kuksa.val.v1 import val_pb2_grpc as val_grpc_v1
from kuksa.val.v2 import types_pb2 as types_v2
from kuksa.val.v2 import val_pb2 as val_v2
from kuksa.val.v2 import val_pb2_grpc as val_grpc_v2

import idlefleet.agent.sources
from idlefleet.agent.sources.kuksa import KuksaSource
from idlefleet.agent.vehicle_state import GEAR_DRIVE, GEAR_PARK, StateReading, VehicleState

SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
CHIP = "Vehicle.ControlUnit.Inference.Health.Resources"

# A parked, charging car. Floats are exact in float32, the type the broker sends them as.
PARKED: dict[str, Any] = {
    "Vehicle.Speed": 0.0,
    "Vehicle.IsMoving": False,
    GEAR: GEAR_PARK,
    "Vehicle.Powertrain.Transmission.IsParkLockEngaged": True,
    "Vehicle.LowVoltageSystemState": "LOCK",
    SOC: 80.5,
    "Vehicle.Powertrain.TractionBattery.Charging.IsCharging": True,
    "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition."
    "IsChargingCableConnected": True,
    "Vehicle.Powertrain.TractionBattery.Temperature.Average": 21.5,
    "Vehicle.CurrentLocation.Latitude": 48.125,
    "Vehicle.CurrentLocation.Longitude": 11.5,
    "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus": "EMPTY",
    "Vehicle.Connectivity.IsConnectivityAvailable": True,
    f"{CHIP}.Temperature": 45.5,
    f"{CHIP}.Power": 30.0,
    f"{CHIP}.Utilization": 0.0,
}

WAIT = 5.0  # seconds to wait for any one reading; the file finishes in a few seconds


def datapoint(value: Any) -> types_v2.Datapoint:
    """A v2 datapoint as the broker sends it; None is a signal without a value."""
    if value is None:
        return types_v2.Datapoint()
    if isinstance(value, bool):
        return types_v2.Datapoint(value=types_v2.Value(bool=value))
    if isinstance(value, int):
        return types_v2.Datapoint(value=types_v2.Value(int32=value))
    if isinstance(value, float):
        return types_v2.Datapoint(value=types_v2.Value(float=value))
    return types_v2.Datapoint(value=types_v2.Value(string=value))


class _Servicer(val_grpc_v2.VALServicer):
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    def Subscribe(
        self, request: val_v2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[val_v2.SubscribeResponse]:
        changes: queue.Queue[Mapping[str, Any] | None] = queue.Queue()
        paths = list(request.signal_paths)
        with self.broker.lock:
            snapshot = {p: datapoint(self.broker.values.get(p)) for p in paths}
            self.broker.streams.append(changes)
            self.broker.subscriptions += 1
        try:
            yield val_v2.SubscribeResponse(entries=snapshot)
            while context.is_active():
                try:
                    change = changes.get(timeout=0.02)
                except queue.Empty:
                    continue
                if change is None:
                    context.abort(grpc.StatusCode.INTERNAL, "fake broker broke the stream")
                    return  # abort raises; this is for the type checker
                yield val_v2.SubscribeResponse(
                    entries={p: datapoint(v) for p, v in change.items() if p in paths}
                )
        finally:
            with self.broker.lock:
                self.broker.streams.remove(changes)
            self.broker.stream_ended.set()


class _ServerInfo(val_grpc_v1.VALServicer):
    def GetServerInfo(
        self, request: val_v1.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> val_v1.GetServerInfoResponse:
        return val_v1.GetServerInfoResponse(name="fake-databroker", version="test")


class FakeBroker:
    """A databroker holding current values; `publish` changes them and notifies streams."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.lock = threading.Lock()
        self.values = dict(values)
        self.streams: list[queue.Queue[Mapping[str, Any] | None]] = []
        self.subscriptions = 0
        self.stream_ended = threading.Event()
        self.port = 0
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=8)
        server = grpc.server(self._pool)
        val_grpc_v2.add_VALServicer_to_server(_Servicer(self), server)
        val_grpc_v1.add_VALServicer_to_server(_ServerInfo(), server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"could not bind 127.0.0.1:{self.port}"
        self.port = port
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def publish(self, changes: Mapping[str, Any]) -> None:
        with self.lock:
            self.values.update(changes)
            for stream in self.streams:
                stream.put(dict(changes))

    def break_streams(self) -> None:
        with self.lock:
            for stream in self.streams:
                stream.put(None)


class Readings:
    """Collects what the source delivers to its listener (on the source's thread)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[StateReading] = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, reading: StateReading) -> None:
        self.threads.add(threading.current_thread().name)
        self.queue.put(reading)

    def wait_for(self, matches: Callable[[StateReading], bool], what: str) -> StateReading:
        """The first reading (from now on) that ``matches``; fails after `WAIT` seconds."""
        deadline = time.monotonic() + WAIT
        seen: list[StateReading] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                reading = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if matches(reading):
                return reading
            seen.append(reading)
        pytest.fail(f"no reading {what} within {WAIT} s; got {seen}")


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    fake = FakeBroker(PARKED)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def source(broker: FakeBroker) -> Iterator[KuksaSource]:
    src = KuksaSource(
        "127.0.0.1", broker.port, connect_timeout=1.0, min_backoff=0.05, max_backoff=0.2
    )
    yield src
    src.stop()


@pytest.fixture
def readings(source: KuksaSource) -> Readings:
    """The source, started; its first (snapshot) reading is left in the queue."""
    collected = Readings()
    source.start(collected)
    return collected


def readable(reading: StateReading) -> bool:
    return reading.readable


def test_initial_snapshot_becomes_a_readable_parked_state(readings: Readings) -> None:
    first = readings.wait_for(lambda r: True, "at all")

    assert first.error is None
    assert first.state == VehicleState.from_signals(PARKED)
    assert first.state.parked
    assert first.state.selected_gear == GEAR_PARK
    assert first.state.soc_percent == 80.5
    assert first.state.low_voltage_state == "LOCK"
    assert readings.threads and threading.current_thread().name not in readings.threads


def test_partial_update_changes_gear_and_keeps_the_rest(
    broker: FakeBroker, readings: Readings
) -> None:
    before = readings.wait_for(readable, "for the snapshot").state

    broker.publish({GEAR: GEAR_DRIVE})
    after = readings.wait_for(lambda r: r.state.selected_gear == GEAR_DRIVE, "in drive")

    assert after.readable
    assert after.state == replace(before, selected_gear=GEAR_DRIVE)
    assert after.state.soc_percent == 80.5


def test_signal_without_value_becomes_unknown(broker: FakeBroker, readings: Readings) -> None:
    readings.wait_for(readable, "for the snapshot")

    broker.publish({"Vehicle.Speed": None})
    reading = readings.wait_for(lambda r: r.state.speed_kmh is None, "without speed")

    assert reading.readable
    assert not reading.state.parked  # an unknown speed is not "parked"


@pytest.mark.parametrize(
    ("path", "garbage", "fixed", "field"),
    [
        (SOC, 140.0, 79.5, "soc_percent"),
        ("Vehicle.Speed", "fast", 0.0, "speed_kmh"),
        (GEAR, True, GEAR_PARK, "selected_gear"),
    ],
)
def test_garbage_value_is_an_error_until_a_valid_value_replaces_it(
    broker: FakeBroker, readings: Readings, path: str, garbage: Any, fixed: Any, field: str
) -> None:
    before = readings.wait_for(readable, "for the snapshot").state

    broker.publish({path: garbage})
    broken = readings.wait_for(lambda r: not r.readable, f"with {path} = {garbage!r} refused")
    broker.publish({path: fixed})
    healed = readings.wait_for(readable, f"after {path} = {fixed!r}")

    assert broken.error is not None and path in broken.error
    assert broken.state == before  # the last valid values are kept for display
    assert getattr(healed.state, field) == fixed


def test_lost_broker_is_reported_and_the_source_reconnects(
    broker: FakeBroker, readings: Readings
) -> None:
    readings.wait_for(readable, "for the snapshot")

    broker.stop()
    lost = readings.wait_for(lambda r: not r.readable, "reporting the lost broker")
    broker.values[SOC] = 60.5
    broker.start()  # same port
    back = readings.wait_for(readable, "after the broker came back")

    assert lost.error is not None and "kuksa" in lost.error
    assert str(broker.port) in lost.error
    assert back.error is None
    assert back.state.soc_percent == 60.5
    assert broker.subscriptions == 2


def test_broken_stream_is_reported_and_the_source_resubscribes(
    broker: FakeBroker, readings: Readings
) -> None:
    readings.wait_for(readable, "for the snapshot")

    broker.break_streams()
    lost = readings.wait_for(lambda r: not r.readable, "reporting the broken stream")
    back = readings.wait_for(readable, "after resubscribing")

    assert lost.error is not None and "kuksa" in lost.error
    assert "fake broker broke the stream" in lost.error
    assert back.state == VehicleState.from_signals(PARKED)
    assert broker.subscriptions == 2


def test_unreachable_broker_is_reported_as_lost() -> None:
    free = FakeBroker({})
    free.start()
    port = free.port
    free.stop()  # nothing listens on this port now
    src = KuksaSource("127.0.0.1", port, connect_timeout=1.0, min_backoff=0.05, max_backoff=0.2)
    collected = Readings()

    src.start(collected)
    try:
        first = collected.wait_for(lambda r: True, "at all")
    finally:
        src.stop()

    assert first.error is not None and f"kuksa databroker at 127.0.0.1:{port}" in first.error
    assert first.state == VehicleState()


def test_stop_is_quick_and_ends_the_readings(
    broker: FakeBroker, source: KuksaSource, readings: Readings
) -> None:
    readings.wait_for(readable, "for the snapshot")

    started = time.monotonic()
    source.stop()
    took = time.monotonic() - started
    ended = broker.stream_ended.wait(WAIT)
    broker.publish({GEAR: GEAR_DRIVE})

    assert took < 2.0
    assert ended, "the subscription stream was not cancelled"
    with pytest.raises(queue.Empty):
        readings.queue.get(timeout=0.3)


def test_missing_extra_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kuksa_client", None)
    monkeypatch.setitem(sys.modules, "kuksa_client.grpc", None)
    monkeypatch.delitem(sys.modules, "idlefleet.agent.sources.kuksa")
    monkeypatch.delattr(idlefleet.agent.sources, "kuksa", raising=False)

    module = importlib.import_module("idlefleet.agent.sources.kuksa")  # imports without it
    with pytest.raises(ImportError) as raised:
        module.KuksaSource("127.0.0.1", 55555)

    assert "idlefleet[kuksa]" in str(raised.value)
    assert "pip install" in str(raised.value)
