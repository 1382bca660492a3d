"""The dashboard's answer, piece by piece (``coordinator/overview.py``), and the page itself."""

from __future__ import annotations

import re

from idlefleet.coordinator.api.app import DASHBOARD_PAGE
from idlefleet.coordinator.overview import (
    CarView,
    batch_json,
    car_counts,
    hardware_label,
    owners_money,
)
from idlefleet.coordinator.store import BatchRecord, RequestCounts


def test_hardware_label_names_accelerator_provider_and_precision() -> None:
    hardware = {"accelerator": "HW4", "provider": "CUDAExecutionProvider", "precision": "fp16"}
    assert hardware_label(hardware) == "HW4 · CUDA · fp16"
    assert hardware_label({}) == "unknown"


def test_owners_money_splits_payable_and_escrow_per_owner_and_ignores_other_accounts() -> None:
    balances = {
        "customer:acme": -1000,
        "escrow:alice": 300,
        "owner:alice": 200,
        "escrow:bob": 50,
        "platform:fees": 450,
    }
    assert owners_money(balances) == [
        {"owner": "alice", "payable": 200, "escrow": 300},
        {"owner": "bob", "payable": 0, "escrow": 50},
    ]


def test_batch_progress_counts_finished_requests_failed_included() -> None:
    counts = RequestCounts(total=8, completed=5, failed=1, pending=2)
    batch = BatchRecord("b1", "f1", "/v1/embeddings", "24h", "in_progress", 1, 2)
    row = batch_json(BatchRecord(**{**batch.__dict__, "request_counts": counts}))
    assert (row["progress"], row["completed"], row["total"]) == (0.75, 5, 8)
    assert batch_json(batch)["progress"] == 0.0  # no requests yet: no division by zero


def test_car_counts_by_status_hardware_and_trust() -> None:
    cars = [
        CarView("a", "working", None, "HW4", "trusted", (48.1, 11.6), 0.5),
        CarView("b", "paused", "not_parked", "HW4", "new", None, 1.0),
        CarView("c", "working", None, "AI5", "quarantined", None, None),
    ]
    counts = car_counts(cars)
    assert counts["by_status"] == {"working": 2, "paused": 1}
    assert counts["by_hardware"] == {"HW4": 2, "AI5": 1}
    assert counts["by_trust"] == {"trusted": 1, "new": 1, "quarantined": 1}
    assert cars[2].json()["last_seen_s_ago"] is None and cars[0].json()["location"] == [48.1, 11.6]


def test_the_page_loads_nothing_from_anywhere_else_and_ships_the_outline() -> None:
    page = DASHBOARD_PAGE().decode()
    assert "__WORLD__" not in page
    land = re.search(r'<path id="land" d="([^"]+)"', page)
    assert land is not None and land.group(1).count("M") > 100  # the continents and islands
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"""fetch\(\s*["']https?:""", page)
