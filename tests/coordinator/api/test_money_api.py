"""The money routes over real HTTP on the production app: who sees which statement, and the
statements' figures from the ledger's entries."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from idlefleet.coordinator.ledger import Prices, Work, charge_entry, release_entry, reversal_entry
from tests.coordinator.api.live import LiveCoordinator, live_coordinator

PRICES = Prices()
MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("money-api")) as running:
        running.enrol("alice-1", owner="alice")
        running.enrol("bob-1", owner="bob")
        now = time.time()
        paid = charge_entry(
            Work("batch:b1:alice-1", "acme", "alice-1", "alice", MODEL, 10, 90_000, 0, 7.2e6, now),
            PRICES,
            now,
        )
        held = charge_entry(
            Work("batch:b2:alice-1", "globex", "alice-1", "alice", MODEL, 5, 20_000, 0, 0.0, now),
            PRICES,
            now,
        )
        caught = charge_entry(
            Work("batch:b1:bob-1", "acme", "bob-1", "bob", MODEL, 4, 50_000, 0, 0.0, now),
            PRICES,
            now,
        )
        store = running.work.store
        store.post_entries([paid, held, caught, release_entry(paid, now)])
        store.post_entries([reversal_entry(caught, now)])
        running.charges = {"paid": paid, "held": held, "caught": caught}  # type: ignore[attr-defined]
        yield running


def test_an_owner_sees_what_their_car_earned_payable_and_in_escrow(live: LiveCoordinator) -> None:
    c = live.charges  # type: ignore[attr-defined]
    status, body = live.call("GET", "/fleet/earnings?vehicle_id=alice-1", key="alice")
    assert status == 200 and body["currency"] == "USD"
    [row] = body["data"]
    assert row["earned"] == c["paid"].earned + c["held"].earned
    assert row["payable"] == c["paid"].earned and row["escrow"] == c["held"].earned
    assert row["kwh"] == pytest.approx(2.0) and row["requests"] == 15
    assert row["net"] == row["earned"] - row["electricity"]
    # Another owner's car is not found for alice; bob's reversed charge is not earned.
    assert live.call("GET", "/fleet/earnings?vehicle_id=bob-1", key="alice")[0] == 404
    _, bob = live.call("GET", "/fleet/earnings", key="bob")
    assert bob["data"][0]["earned"] == 0 and bob["data"][0]["reversed"] == c["caught"].earned


def test_a_customer_sees_its_usage_with_refunds(live: LiveCoordinator) -> None:
    c = live.charges  # type: ignore[attr-defined]
    status, body = live.call("GET", "/fleet/usage", key="acme")
    assert status == 200
    [row] = body["data"]
    assert row["input_tokens"] == 140_000 and row["requests"] == 14
    assert row["charged"] == c["paid"].charged + c["caught"].charged
    assert row["refunded"] == c["caught"].charged and row["cost"] == c["paid"].charged
    assert live.call("GET", "/fleet/usage", key="alice")[0] == 403


def test_only_the_operator_reads_the_ledger_and_its_balances_sum_to_zero(
    live: LiveCoordinator,
) -> None:
    assert live.call("GET", "/fleet/ledger", key="acme")[0] == 403
    status, body = live.call("GET", "/fleet/ledger", key="operator")
    assert status == 200 and body["total"] == 0
    assert len(body["data"]) == 5
    assert body["balances"]["owner:alice"] == live.charges["paid"].earned  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path",
    [
        "/fleet/earnings?format=xml",
        "/fleet/earnings?vehicle_id=bad%20id",
        "/fleet/ledger?limit=0",
        "/fleet/usage?principal=" + "x" * 300,
    ],
)
def test_bad_queries_are_refused_with_a_400(live: LiveCoordinator, path: str) -> None:
    status, body = live.call("GET", path, key="operator")
    assert status == 400 and body["error"]["message"]


def test_a_statement_comes_as_csv_in_units(live: LiveCoordinator) -> None:
    import urllib.request

    request = urllib.request.Request(
        live.base_url + "/fleet/earnings?format=csv",
        headers={"Authorization": f"Bearer {live.keys['alice']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/csv")
        text = response.read().decode()
    header, line = text.splitlines()
    assert header.split(",")[:3] == ["day", "vehicle_id", "requests"]
    earned = live.charges["paid"].earned + live.charges["held"].earned  # type: ignore[attr-defined]
    assert line.split(",")[5] == f"{earned // 1_000_000}.{earned % 1_000_000:06d}"


def test_usage_is_reported_per_api_key_and_a_customer_sees_only_its_own(
    live: LiveCoordinator,
) -> None:
    now = time.time()
    charges = [
        charge_entry(
            Work(
                f"online:run_{i}",
                "initech",
                "alice-1",
                "alice",
                MODEL,
                1,
                tokens,
                0,
                0.0,
                now,
                api_key_id=key,
            ),
            PRICES,
            now,
        )
        for i, (key, tokens) in enumerate([("key_a", 1000), ("key_a", 500), ("key_b", 70)])
    ]
    live.work.store.post_entries(charges)

    status, body = live.call("GET", "/fleet/usage?principal=initech", key="operator")
    assert status == 200
    by_key = {row["api_key_id"]: row for row in body["data"]}
    assert by_key["key_a"]["input_tokens"] == 1500 and by_key["key_a"]["requests"] == 2
    assert by_key["key_b"]["cost"] == charges[2].charged
    _, one = live.call("GET", "/fleet/usage?principal=initech&api_key_id=key_b", key="operator")
    assert [row["api_key_id"] for row in one["data"]] == ["key_b"]
    # Another customer asking for initech's key sees nothing of it.
    _, theirs = live.call("GET", "/fleet/usage?api_key_id=key_a", key="acme")
    assert theirs["data"] == []
