"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against the real
stack: the page loads, a running batch's progress moves, a car shows paused when its trace
leaves Park, and an owner sees only their own cars. Screenshots are kept in
``test-artifacts/dashboard/`` (CI keeps the clone's)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from playwright.sync_api import Page, sync_playwright

from idlefleet.agent.sources.trace import StateTrace, TraceEvent, parked_state
from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import submit, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
DRIVE_S = 25.0
"""When car-001's trace leaves Park (real seconds after it starts)."""
N = 6000
GEAR = "Vehicle.Powertrain.Transmission.SelectedGear"
LOCK = "Vehicle.Powertrain.Transmission.IsParkLockEngaged"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("dashboard"),
        agents=0,
        lease_seconds=10.0,
        heartbeat_seconds=1.0,
        max_unit=64,
    )
    with EmbeddedFleet(options) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), (
        "the dashboard test needs Debian's chromium: apt-get install -y chromium (make test does)"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


def open_page(browser: object, fleet: EmbeddedFleet, key: str) -> Page:
    page = browser.new_page(viewport={"width": 1440, "height": 1100})  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(f"{fleet.base_url}/dashboard#key={fleet.keys[key]}")
    return page


def progress_of(page: Page, batch_id: str) -> float:
    row = page.locator(f'tr[data-batch="{batch_id}"]')
    return float(row.get_attribute("data-progress") or 0) if row.count() else -1.0


def test_the_operator_sees_progress_move_and_a_car_pause_when_it_leaves_park(
    fleet: EmbeddedFleet, browser: object, tmp_path: Path
) -> None:
    trace = tmp_path / "drive-away.jsonl"
    StateTrace.from_events(
        time.time(),
        [
            TraceEvent(0.0, parked_state(latitude=48.14, longitude=11.58)),
            TraceEvent(DRIVE_S, {GEAR: 127, LOCK: False}),
            TraceEvent(DRIVE_S + 0.5, {"Vehicle.IsMoving": True, "Vehicle.Speed": 6.0}),
        ],
    ).save(trace)
    fleet.options.trace_speed = 1.0
    fleet.add_agent("car-001", trace=trace, resume_after_s=0.0)
    fleet.options.trace_speed = 60.0
    fleet.add_agent("car-002")
    client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)

    page = open_page(browser, fleet, "operator")
    page.wait_for_selector('tr[data-car="car-001"][data-status]', timeout=30_000)
    assert page.locator("#role").inner_text().startswith("operator")
    assert page.locator('#pins circle[data-pin="car-001"]').count() == 1  # on the map

    batch = submit(client, batch_input(demo_texts(N)))
    seen: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = progress_of(page, batch.id)
        if progress >= 0 and (not seen or progress != seen[-1]):
            seen.append(progress)
        if len([p for p in seen if 0 < p < 1]) >= 2:
            break
        page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "operator-batch-running.png"), full_page=True)
    moving = [p for p in seen if 0 < p < 1]
    assert len(moving) >= 2 and moving == sorted(moving), seen  # the bar moved, forwards

    # car-001's trace leaves Park at DRIVE_S: the page shows it paused, on the map too.
    page.wait_for_selector('tr[data-car="car-001"][data-status="paused"]', timeout=60_000)
    reason = page.locator('tr[data-car="car-001"] td').nth(2).inner_text()
    assert "not_parked" in reason, reason
    pin = page.locator('#pins circle[data-pin="car-001"]')
    assert pin.get_attribute("fill") == "var(--paused)"
    page.screenshot(path=str(ARTIFACTS / "operator-car-paused.png"), full_page=True)

    done = wait_for(client, batch.id, timeout=240)
    assert done.status == "completed", done
    page.wait_for_function(
        f'document.querySelector(\'tr[data-batch="{batch.id}"]\')?.dataset.progress === "1.0"'
        f' || document.querySelector(\'tr[data-batch="{batch.id}"]\')?.dataset.progress === "1"',
        timeout=15_000,
    )
    page.screenshot(path=str(ARTIFACTS / "operator-batch-done.png"), full_page=True)
    assert not page.errors, page.errors  # type: ignore[attr-defined]


def test_an_owner_sees_only_their_own_cars_and_no_batches(
    fleet: EmbeddedFleet, browser: object
) -> None:
    fleet.post(
        "/fleet/enrolments",
        {"vehicle_id": "car-foreign", "nkey": "U" + "A" * 55, "owner": "someone-else"},
    )
    mine = {e["vehicle_id"] for e in fleet.get("/fleet/enrolments", key="owner")["data"]}
    assert "car-foreign" not in mine and mine

    page = open_page(browser, fleet, "owner")
    page.wait_for_selector("tr[data-car]", timeout=30_000)
    page.wait_for_timeout(2500)  # one more refresh
    shown = {row.get_attribute("data-car") for row in page.locator("tr[data-car]").all()}
    assert shown == mine
    assert page.locator("#role").inner_text().startswith("owner")
    assert not page.locator("section.batches").is_visible()
    page.screenshot(path=str(ARTIFACTS / "owner.png"), full_page=True)
    assert not page.errors, page.errors  # type: ignore[attr-defined]


def test_a_wrong_key_gets_the_sign_in_form_with_the_reason(
    fleet: EmbeddedFleet, browser: object
) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{fleet.base_url}/dashboard#key=ifk_{'x' * 40}")
    page.wait_for_selector("#login:not([hidden])", timeout=15_000)
    assert "key" in page.locator("#login-error").inner_text().lower()
    assert not page.locator("#app").is_visible()
