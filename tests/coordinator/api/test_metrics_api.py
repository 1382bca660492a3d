"""``/metrics`` and ``/fleet/overview`` over real HTTP on the production app: who may read
them, and what they say."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.overview import Overview
from idlefleet.coordinator.store import Store, VehicleRecord
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.messages import CarFigures, Hardware, Heartbeat
from tests.coordinator.api.live import LiveCoordinator, live_coordinator


def fleet_metrics(store: Store, work: WorkService) -> Metrics:
    metrics = Metrics(fleet=lambda: store.fleet_counts(time.time() - 60))
    work.metrics = metrics
    return metrics


def overview(store: Store, work: WorkService) -> Overview:
    assert work.metrics is not None
    return Overview(work, work.metrics, lambda: "USD")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(
        tmp_path_factory.mktemp("metrics-api"), metrics=fleet_metrics, overview=overview
    ) as running:
        now = time.time()
        hardware = Hardware(accelerator="HW4", tops=50, memory_gb=8, power_w=80).model_dump()
        for car, owner in (("alice-1", "alice"), ("alice-2", "alice"), ("bob-1", "bob")):
            running.enrol(car, owner=owner)
            record = VehicleRecord(car, hardware, ("all-MiniLM-L6-v2",), now, now, "idle")
            running.work.store.upsert_vehicles([record])
            running.work.registry.registered(record)
        running.work.heartbeat(
            "alice-1",
            Heartbeat(
                seq=1,
                status="paused",
                reason="not_parked",
                location=(48.14, 11.58),
                figures=CarFigures(runs=3, compute_s=1.5, energy_j=90.0, stop_s=[0.005]),
            ),
        )
        running.work.flush_liveness()  # as the replica does every second: the store knows
        yield running


def scrape(live: LiveCoordinator, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {live.keys[key]}"} if key else {}
    request = urllib.request.Request(live.base_url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_answer_without_a_key_in_prometheus_text(live: LiveCoordinator) -> None:
    status, text = scrape(live)
    assert status == 200
    got = values(text)
    assert got[("idlefleet_cars", (("status", "idle"),))] == 2
    assert got[("idlefleet_cars", (("status", "paused"),))] == 1
    assert got[("idlefleet_batches", (("status", "completed"),))] == 0
    assert got[("idlefleet_car_model_runs_total", ())] == 3  # from the heartbeat
    assert got[("idlefleet_car_stop_seconds_count", ())] == 1


def test_http_latency_is_labelled_by_route_template_never_by_an_id(live: LiveCoordinator) -> None:
    live.call("GET", "/v1/batches/batch_does_not_exist", key="acme")
    live.call("GET", "/fleet/vehicles", key="operator")
    _, text = scrape(live)
    routes = {dict(k[1]).get("route") for k in values(text) if k[0].startswith("idlefleet_http")}
    assert "/v1/batches/{batch_id}" in routes and "/fleet/vehicles" in routes
    assert not any("batch_does_not_exist" in (r or "") for r in routes)


def test_metrics_can_require_the_operators_key(tmp_path: pytest.TempPathFactory) -> None:
    with live_coordinator(tmp_path, metrics=fleet_metrics, metrics_need_key=True) as closed:  # type: ignore[arg-type]
        assert scrape(closed)[0] == 401
        assert scrape(closed, "acme")[0] == 403
        status, text = scrape(closed, "operator")
        assert status == 200 and "idlefleet_batches" in text


def test_the_overview_shows_an_operator_every_car_and_an_owner_only_theirs(
    live: LiveCoordinator,
) -> None:
    status, everyone = live.call("GET", "/fleet/overview", key="operator")
    assert status == 200 and everyone["role"] == "operator"
    cars = {c["id"]: c for c in everyone["cars"]}
    assert set(cars) == {"alice-1", "alice-2", "bob-1"}
    assert cars["alice-1"]["status"] == "paused" and cars["alice-1"]["reason"] == "not_parked"
    assert cars["alice-1"]["location"] == [48.14, 11.58]
    assert cars["alice-1"]["hardware"] == "HW4 · CPU · fp32"
    assert everyone["fleet"]["cars"]["idle"] == 2 and "batches" in everyone

    status, alice = live.call("GET", "/fleet/overview", key="alice")
    assert status == 200 and alice["role"] == "owner" and alice["owner"] == "alice"
    assert {c["id"] for c in alice["cars"]} == {"alice-1", "alice-2"}
    assert "batches" not in alice and "work" not in alice
    assert live.call("GET", "/fleet/overview", key="acme")[0] == 403  # customers: no


def test_the_dashboard_page_needs_no_key_and_forbids_loading_from_elsewhere(
    live: LiveCoordinator,
) -> None:
    with urllib.request.urlopen(live.base_url + "/dashboard", timeout=10) as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert "<title>idlefleet" in page and 'id="land"' in page
    assert "default-src 'self'" in policy
