"""The fleet API's view of verification (``/fleet/verification``) and an operator
reinstating a quarantined car, over real HTTP on the production app."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from idlefleet.coordinator.trust import CarTrust
from tests.coordinator.api.live import LiveCoordinator, live_coordinator


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("verification-api")) as running:
        running.enrol("alice-1", owner="alice")
        running.enrol("alice-2", owner="alice")
        running.enrol("bob-1", owner="bob")
        running.work.store.put_trust(
            [
                CarTrust("alice-1", streak=40, agreed=40, verified_through=time.time()),
                CarTrust("alice-2", streak=2, agreed=2),
                CarTrust("bob-1", disagreed=1, quarantined_at=time.time(), reason="a lie"),
            ],
            time.time(),
        )
        assert running.work.verifier is not None
        running.work.verifier.refresh()
        yield running


def test_the_operator_sees_every_car_with_its_state_and_rate(live: LiveCoordinator) -> None:
    status, body = live.call("GET", "/fleet/verification", key="operator")
    assert status == 200 and body["enabled"] is True
    cars = {c["vehicle_id"]: c for c in body["cars"]}
    assert {k: c["state"] for k, c in cars.items()} == {
        "alice-1": "trusted",
        "alice-2": "new",
        "bob-1": "quarantined",
    }
    assert cars["alice-2"]["check_rate"] == 1.0
    assert 0 < cars["alice-1"]["check_rate"] < 1.0
    assert cars["bob-1"]["reason"] == "a lie"
    assert body["policy"]["floor"] == 0.02 and "counters" in body and "overhead" in body


def test_an_owner_sees_only_their_own_cars_and_no_fleet_counters(live: LiveCoordinator) -> None:
    status, body = live.call("GET", "/fleet/verification", key="alice")
    assert status == 200
    assert sorted(c["vehicle_id"] for c in body["cars"]) == ["alice-1", "alice-2"]
    assert "counters" not in body
    status, body = live.call("GET", "/fleet/verification", key="acme")
    assert status == 403


def test_only_an_operator_reinstates_and_only_a_quarantined_car(live: LiveCoordinator) -> None:
    assert live.call("POST", "/fleet/vehicles/bob-1/reinstate", key="bob")[0] == 403
    status, error = live.call("POST", "/fleet/vehicles/alice-1/reinstate", key="operator")
    assert status == 404 and error["error"]["code"] == "vehicle_not_quarantined"
    status, body = live.call("POST", "/fleet/vehicles/bob-1/reinstate", key="operator")
    assert status == 200 and body == {"vehicle_id": "bob-1", "state": "new", "streak": 0}
    stored = live.work.store.get_trust(["bob-1"])["bob-1"]
    assert not stored.quarantined and stored.disagreed == 1
    status, body = live.call("GET", "/fleet/verification", key="bob")
    assert [c["state"] for c in body["cars"]] == ["new"]
