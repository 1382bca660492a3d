"""The car's daily energy survives a SIGKILL of its agent (no clean shutdown, no final save).

Every joule the agent reported to the coordinator (``energy_j`` of each result chunk, summed
in its leases) was metered, and so written to the meter file, before it was sent: the file
read after the kill holds at least that, and at most one run more (a run metered whose chunk
had not gone out yet). The restarted agent counts on from the file, not from zero.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import submit, wait_for

pytestmark = pytest.mark.integration

CAR = "car-001"


def meter_file(fleet: EmbeddedFleet) -> dict[str, Any]:
    path = fleet.options.data_dir / "models" / "state" / f"{CAR}.energy.json"
    return json.loads(path.read_text())


def car_leases(fleet: EmbeddedFleet) -> list[dict[str, Any]]:
    leases = fleet.get("/fleet/leases?all=1")["data"]
    return [lease for lease in leases if lease["vehicle_id"] == CAR]


def test_a_killed_agent_keeps_the_days_energy(tmp_path: Path) -> None:
    options = FleetOptions(
        data_dir=tmp_path, agents=1, lease_seconds=3.0, heartbeat_seconds=1.0, max_unit=32
    )
    with EmbeddedFleet(options) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        batch = submit(client, batch_input(demo_texts(4000)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = client.batches.retrieve(batch.id).request_counts
            if done is not None and done.completed >= 300:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the car never committed 300 results")
        fleet.kill_agent(CAR)
        at_kill = meter_file(fleet)
        time.sleep(1.0)  # any chunk in flight has been committed (or lost with the car)
        leases = car_leases(fleet)
        reported = sum(lease["energy_j"] for lease in leases)
        one_run = max(lease["energy_j"] for lease in leases)  # a unit of <= 32 texts: one run
        assert reported > 0
        # Everything reported was in the file; what was not is at most one run.
        assert reported <= at_kill["today_j"] + 1e-6
        assert at_kill["today_j"] - reported <= one_run + 1e-6

        # Restarted, it counts on from the file: the day's total only grows by what it
        # meters now, and every run's energy reaches the coordinator again.
        before = {lease["id"] for lease in leases}
        fleet.add_agent(CAR)
        finished = wait_for(client, batch.id, timeout=300)
        assert finished.status == "completed"
        after = meter_file(fleet)
        if after["day"] != at_kill["day"]:
            pytest.skip("the car's local day changed during the test")
        new = sum(lease["energy_j"] for lease in car_leases(fleet) if lease["id"] not in before)
        assert new > 0
        assert after["today_j"] == pytest.approx(at_kill["today_j"] + new, rel=1e-9, abs=1e-6)
