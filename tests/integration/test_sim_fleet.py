"""``idlefleet up --fleet sim``: real agents whose cars are cars of the fleet model.

Three agents replay three model cars, time-compressed 1,500x (a day in under a minute). The
test takes the model's own timetable for those cars and checks that the real stack follows it:
cars the model has computing at the start take a batch; the first car the model sends driving
shows up paused as not parked; and when it is parked and allowed again, it is back to work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from openai import OpenAI

from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.sim.params import SimParams
from tests.integration.conftest import request_line, submit, wait_for

pytestmark = pytest.mark.integration

SPEED = 1500.0
PARAMS = SimParams.build(opt_in_rate=1.0, days=2, seed=4)


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("sim-fleet"),
        agents=3,
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        fleet="sim",
        sim_params=PARAMS,
        trace_speed=SPEED,
    )
    with EmbeddedFleet(options) as running:
        running.started_at = time.monotonic()  # type: ignore[attr-defined]
        yield running


def statuses(fleet: EmbeddedFleet) -> dict[str, tuple[str, str | None]]:
    listing = fleet.get("/fleet/vehicles") or {"data": []}
    return {v["id"]: (v["status"], v["status_reason"]) for v in listing["data"]}


def test_each_agent_is_a_model_car_with_its_hardware_and_owner_policy(sim_fleet) -> None:
    listing = {v["id"]: v for v in sim_fleet.get("/fleet/vehicles")["data"]}
    assert len(sim_fleet.sim_cars) == 3
    for car in sim_fleet.sim_cars:
        vehicle_id = f"car-{car.index + 1:03d}"
        assert listing[vehicle_id]["hardware"]["accelerator"] == car.hardware.name
        assert listing[vehicle_id]["hardware"]["tops"] == car.hardware.int8_tops
        policy = sim_fleet.get(f"/fleet/vehicles/{vehicle_id}/policy")["policy"]
        assert policy == car.policy.model_dump(mode="json")


def test_the_stack_follows_the_model_timetable(sim_fleet) -> None:
    client = OpenAI(base_url=f"{sim_fleet.base_url}/v1", api_key=sim_fleet.api_key, max_retries=0)
    cars = {f"car-{c.index + 1:03d}": c for c in sim_fleet.sim_cars}
    # The model's timetable (trace seconds): who computes from the start, who leaves first.
    early = [vid for vid, c in cars.items() if c.sessions and c.sessions[0][0] <= 600]
    assert early, "seed 4 should give at least one car computing from the start"
    # The car that first leaves and later computes again (a session after its first trip).
    comebacks = {
        vid: next(s for s, _ in c.sessions if s > c.trips[0][1])
        for vid, c in cars.items()
        if c.trips and any(s > c.trips[0][1] for s, _ in c.sessions)
    }
    assert comebacks, "seed 4 should give a car that leaves and computes again"
    leaver = min(comebacks, key=comebacks.__getitem__)
    back_to_work = comebacks[leaver]

    # A batch submitted at once is done by the cars the model has computing.
    lines = [
        request_line(f"r{i}", {"model": "all-MiniLM-L6-v2", "input": f"s {i}"}) for i in range(200)
    ]
    batch = wait_for(client, submit(client, "\n".join(lines).encode()).id, timeout=60)
    assert batch.status == "completed"
    used = sim_fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
    assert set(used) <= set(early)

    # The first car to leave shows up paused (not parked) while the model has it driving...
    seen: list[tuple[str, str | None]] = []
    deadline = sim_fleet.started_at + back_to_work / SPEED + 30
    while time.monotonic() < deadline:
        status = statuses(sim_fleet)[leaver]
        if not seen or seen[-1] != status:
            seen.append(status)
        if any(s == "paused" and r and "not_parked" in r for s, r in seen) and status[0] in (
            "idle",
            "busy",
        ):
            break
        time.sleep(0.1)
    assert any(s == "paused" and r and "not_parked" in r for s, r in seen), seen
    # ...and is back at work once the model has it parked and allowed again.
    assert seen[-1][0] in ("idle", "busy"), seen
