"""A trace-driven car shifts out of Park in the middle of a unit, on the real stack.

car-001 replays a trace at real speed: parked and charging, then at ``PARK_S`` the gear leaves
Park (the first change of the trace that forbids compute), and the car starts rolling.
car-002 stays parked. The batch is large enough that car-001 is in the middle of a unit when
it leaves; the run must stop there, what car-001
finished must be kept, the rest must go back at once (not at lease expiry) and be done by
car-002, and the batch must complete with every ``custom_id`` exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from idlefleet.agent.sources.trace import StateTrace, TraceEvent, parked_state
from idlefleet.cli.demo import demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import read_jsonl, request_line, submit, wait_for

pytestmark = pytest.mark.integration

N = 8000
PARK_S = 8.0
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
LOCK = "Vehicle.Powertrain.Transmission.IsParkLockEngaged"
GARBAGE_S = 6.0
LEASE_SECONDS = 60.0  # far longer than the test: only a release can bring the work back in time


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("preempt"),
        agents=0,
        lease_seconds=LEASE_SECONDS,
        heartbeat_seconds=1.0,
        max_unit=256,
    )
    with EmbeddedFleet(options) as running:
        yield running


def test_leaving_park_mid_unit_stops_the_run_and_the_rest_is_re_leased(
    fleet: EmbeddedFleet, tmp_path: Path
) -> None:
    client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
    content = "\n".join(
        request_line(f"req-{i}", {"model": "all-MiniLM-L6-v2", "input": text})
        for i, text in enumerate(demo_texts(N))
    ).encode()
    batch = submit(client, content)
    trace_path = tmp_path / "drive-away.jsonl"
    StateTrace.from_events(
        time.time(),
        [
            TraceEvent(0.0, parked_state()),
            TraceEvent(PARK_S, {GEAR: 127, LOCK: False}),
            TraceEvent(PARK_S + 0.5, {"Vehicle.IsMoving": True, "Vehicle.Speed": 6.0}),
        ],
    ).save(trace_path)

    # Real-time replay (speed 1) and no hysteresis: car-001 works from its start until PARK_S.
    fleet.options.trace_speed = 1.0
    fleet.add_agent("car-001", trace=trace_path, resume_after_s=0.0)
    fleet.options.trace_speed = 60.0
    fleet.add_agent("car-002")
    done = wait_for(client, batch.id, timeout=240)

    assert done.status == "completed", done
    lines = read_jsonl(client, done.output_file_id or "")
    counts = Counter(line["custom_id"] for line in lines)
    assert len(counts) == N and set(counts.values()) == {1}
    usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
    assert usage.get("car-001", 0) > 0, usage  # what car-001 finished before it left was kept
    assert usage["car-001"] + usage["car-002"] == N
    assert usage["car-001"] < N / 2  # it stopped; car-002 did the rest

    leases = [
        lease
        for lease in fleet.get("/fleet/leases?all=1")["data"]
        if lease["vehicle_id"] == "car-001"
    ]
    preempted = [lease for lease in leases if lease["state"] == "released"]
    assert preempted, leases
    assert all("preempted" in (lease["end_reason"] or "") for lease in preempted)
    assert any("not_parked" in lease["end_reason"] for lease in preempted)
    assert not [lease for lease in leases if lease["state"] in ("expired", "active")], leases
    assert all(lease["energy_j"] >= 0 for lease in leases)
    assert sum(lease["energy_j"] for lease in leases) > 0

    car = next(v for v in fleet.get("/fleet/vehicles")["data"] if v["id"] == "car-001")
    assert car["status"] == "paused" and "not_parked" in car["status_reason"], car
    log = (fleet.log_dir / "agent-car-001.log").read_text()
    assert "stopped lease_" in log and "releasing the rest" in log, log[-2000:]


def test_garbage_state_pauses_the_car_and_the_agent_keeps_running(
    fleet: EmbeddedFleet, tmp_path: Path
) -> None:
    soc = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
    trace_path = tmp_path / "garbage.jsonl"
    StateTrace.from_events(
        time.time(),
        [TraceEvent(0.0, {**parked_state(), soc: 140.0}), TraceEvent(GARBAGE_S, {soc: 80.0})],
    ).save(trace_path)
    fleet.options.trace_speed = 1.0
    agent = fleet.add_agent("car-003", trace=trace_path, resume_after_s=0.0)
    fleet.options.trace_speed = 60.0

    seen_unreadable = _wait_for_status(fleet, "car-003", "paused", within=GARBAGE_S)
    assert "state_unreadable" in (seen_unreadable["status_reason"] or ""), seen_unreadable
    resumed = _wait_for_status(fleet, "car-003", "idle", within=GARBAGE_S + 10)

    assert resumed["status_reason"] is None
    assert agent.poll() is None  # the agent never stopped running
    log = (fleet.log_dir / "agent-car-003.log").read_text()
    assert "outside 0..100 percent" in log  # the refusal says what was wrong


def _wait_for_status(
    fleet: EmbeddedFleet, vehicle_id: str, status: str, within: float
) -> dict[str, object]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for vehicle in fleet.get("/fleet/vehicles")["data"]:
            if vehicle["id"] == vehicle_id and vehicle["status"] == status:
                return dict(vehicle)
        time.sleep(0.05)
    raise AssertionError(
        f"{vehicle_id} not {status} within {within} s: {fleet.get('/fleet/vehicles')}"
    )
