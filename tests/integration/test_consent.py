"""Owner consent on the real stack: opting out mid-batch, and purposes and data regions."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from idlefleet.cli.demo import demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import request_line, wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_S = 1.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("consent"),
        agents=2,
        lease_seconds=10.0,
        heartbeat_seconds=HEARTBEAT_S,
        max_unit=128,
    )
    with EmbeddedFleet(options) as running:
        yield running


def _batch(client: OpenAI, n: int, **extra: str) -> Any:
    content = "\n".join(
        request_line(f"r-{i}", {"model": "all-MiniLM-L6-v2", "input": text})
        for i, text in enumerate(demo_texts(n))
    ).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        extra_body=extra or None,
    )


def _usage(fleet: EmbeddedFleet, batch_id: str) -> dict[str, int]:
    return dict(fleet.get(f"/fleet/batches/{batch_id}/vehicles")["completed_by_vehicle"])


def _leases_of(fleet: EmbeddedFleet, vehicle_id: str) -> list[dict[str, Any]]:
    return [
        lease
        for lease in fleet.get("/fleet/leases?all=1")["data"]
        if lease["vehicle_id"] == vehicle_id
    ]


def _vehicle(fleet: EmbeddedFleet, vehicle_id: str) -> dict[str, Any]:
    return next(v for v in fleet.get("/fleet/vehicles")["data"] if v["id"] == vehicle_id)


def test_opting_out_mid_batch_stops_the_car_and_it_gets_no_further_lease(
    fleet: EmbeddedFleet, client: OpenAI
) -> None:
    batch = _batch(client, 6000)
    deadline = time.monotonic() + 60
    while _usage(fleet, batch.id).get("car-001", 0) < 200:
        assert time.monotonic() < deadline, "car-001 never started on the batch"
        time.sleep(0.05)

    fleet.set_consent("car-001", False)
    opted_out = time.monotonic()
    while not (
        _vehicle(fleet, "car-001")["status"] == "paused"
        and "opted_out" in (_vehicle(fleet, "car-001")["status_reason"] or "")
    ):
        assert time.monotonic() - opted_out < 3 * HEARTBEAT_S, _vehicle(fleet, "car-001")
        time.sleep(0.02)
    paused_after = time.monotonic() - opted_out
    print(f"car-001 reported paused (opted_out) {paused_after * 1000:.0f} ms after the opt-out")
    leases_at_pause = {lease["id"] for lease in _leases_of(fleet, "car-001")}
    # Results of the run the opt-out stopped may still be in flight for a moment.
    time.sleep(0.5)
    done_at_pause = _usage(fleet, batch.id).get("car-001", 0)

    done = wait_for(client, batch.id, timeout=240)

    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 6000
    assert paused_after <= HEARTBEAT_S, f"paused {paused_after:.2f} s after the opt-out"
    assert _usage(fleet, batch.id).get("car-001", 0) == done_at_pause
    assert {lease["id"] for lease in _leases_of(fleet, "car-001")} == leases_at_pause
    assert all(lease["state"] != "active" for lease in _leases_of(fleet, "car-001"))
    history = fleet.get("/fleet/vehicles/car-001/consent")["data"]
    assert [h["opted_in"] for h in history][-2:] == [True, False]
    assert history[-1]["actor"] == "owner:embedded-fleet"
    assert history[-1]["version"] == history[-2]["version"] + 1

    fleet.set_consent("car-001", True)  # leave the fleet as the next test expects it


def test_units_with_a_purpose_or_region_the_owner_refused_never_reach_the_car(
    fleet: EmbeddedFleet, client: OpenAI
) -> None:
    fleet.set_consent(
        "car-001", True, purposes=["general", "research"], data_regions=["global", "us"]
    )
    advertising = _batch(client, 600, purpose="advertising")
    eu_data = _batch(client, 600, data_region="eu")
    allowed = _batch(client, 1200, purpose="research", data_region="us")
    assert advertising.model_extra and advertising.model_extra["purpose"] == "advertising"

    for batch in (advertising, eu_data, allowed):
        assert wait_for(client, batch.id, timeout=240).status == "completed"

    assert set(_usage(fleet, advertising.id)) == {"car-002"}
    assert set(_usage(fleet, eu_data.id)) == {"car-002"}
    assert _usage(fleet, allowed.id).get("car-001", 0) > 0  # car-001 did work, just not those
    refused_batches = {advertising.id, eu_data.id}
    assert not [
        lease for lease in _leases_of(fleet, "car-001") if lease["batch_id"] in refused_batches
    ]
