"""The ledger through the real stack: a batch's charges are its tokens at the price list's
prices, exactly; the customer's usage and the owner's statement (API and CLI) agree with them;
the books balance."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.coordinator.ledger import Prices
from idlefleet.coordinator.store import open_store
from idlefleet.embedded.fleet import EmbeddedFleet
from tests.integration.conftest import read_jsonl, submit, wait_for

pytestmark = pytest.mark.integration


def get(fleet: EmbeddedFleet, path: str, key: str) -> Any:
    found = fleet.get(path, key=key)
    assert found is not None, path
    return found


def test_a_batch_is_charged_its_tokens_at_the_list_prices_exactly(
    fleet: EmbeddedFleet, client: OpenAI
) -> None:
    prices = Prices()  # the embedded fleet's coordinator runs the built-in list
    before = get(fleet, "/fleet/usage", "customer")["data"]
    batch = wait_for(client, submit(client, batch_input(demo_texts(300))).id)
    assert batch.status == "completed" and batch.output_file_id is not None
    rows = read_jsonl(client, batch.output_file_id)
    tokens = sum(row["response"]["body"]["usage"]["prompt_tokens"] for row in rows)
    model = rows[0]["response"]["body"]["model"]
    by_car = get(fleet, f"/fleet/batches/{batch.id}/vehicles", "operator")["completed_by_vehicle"]

    ledger = get(fleet, f"/fleet/ledger?batch_id={batch.id}", "operator")
    charges = [e for e in ledger["data"] if e["kind"] == "charge"]
    # One charge per car that made results, for exactly the results it made.
    assert Counter({e["vehicle_id"]: e["requests"] for e in charges}) == Counter(by_car)
    assert sum(e["input_tokens"] for e in charges) == tokens
    assert all(e["output_tokens"] == 0 and e["model"] == model for e in charges)
    # Charged to the key the batch was created with: usage per key finds them.
    [key_id] = {e["api_key_id"] for e in charges}
    assert key_id is not None
    mine = get(fleet, f"/fleet/usage?api_key_id={key_id}", "customer")["data"]
    assert sum(r["input_tokens"] for r in mine) >= tokens and {r["api_key_id"] for r in mine} == {
        key_id
    }
    for e in charges:
        amounts = {p["account"]: p["amount"] for p in e["postings"]}
        price = prices.charge(model, e["requests"], e["input_tokens"], 0)
        assert amounts[f"customer:{e['principal']}"] == -price
        earned = price * prices.owner_share_bp // 10_000
        assert amounts.get(f"escrow:{e['owner']}", 0) == earned
        assert amounts.get("platform:fees", 0) == price - earned
        assert e["energy_j"] > 0  # the car metered the work
    assert ledger["total"] == 0  # every account's balance sums to zero
    charged = sum(prices.charge(model, e["requests"], e["input_tokens"], 0) for e in charges)
    assert charged > 0

    # The customer's usage: this batch's tokens and charge on top of what came before.
    after = get(fleet, "/fleet/usage", "customer")["data"]
    assert sum(r["input_tokens"] for r in after) - sum(r["input_tokens"] for r in before) == tokens
    assert sum(r["cost"] for r in after) - sum(r["cost"] for r in before) == charged
    # Owners' keys do not see customers' usage.
    with pytest.raises(urllib.error.HTTPError) as refused:
        fleet.post("/fleet/usage", None, method="GET", key="owner")
    assert refused.value.code == 403
    refused.value.close()

    # The owner's statement: the same earnings, through the API and the CLI.
    car = charges[0]["vehicle_id"]
    statement = get(fleet, f"/fleet/earnings?vehicle_id={car}", "owner")
    mine = sum(
        p["amount"]
        for e in charges
        if e["vehicle_id"] == car
        for p in e["postings"]
        if p["account"] == f"escrow:{e['owner']}"
    )
    assert sum(r["earned"] for r in statement["data"]) == mine  # this module's only batch
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlefleet",
            "owner",
            "earnings",
            "--vehicle",
            car,
            "--coordinator",
            fleet.base_url,
            "--csv",
        ],
        env={**os.environ, "IDLEFLEET_API_KEY": fleet.keys["owner"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    header, *lines = cli.stdout.splitlines()
    assert header.startswith("day,vehicle_id,requests,compute_hours,kwh,earned")
    earned_csv = sum(float(line.split(",")[5]) for line in lines)
    assert earned_csv == pytest.approx(sum(r["earned"] for r in statement["data"]) / 1e6)

    # Past its retention the batch's request rows go (run early here, on the fleet's store):
    # the output file, the counts and who did what (now from the charges) stay as they were.
    store = open_store(fleet.store_url)
    try:
        assert batch.completed_at is not None
        pruned = store.prune_finished_requests(batch.completed_at + 1, time.time())
    finally:
        store.close()
    assert pruned[1] >= 300 and list(store_rows(fleet, batch.id)) == []
    assert get(fleet, f"/fleet/batches/{batch.id}/vehicles", "operator") == {
        "batch_id": batch.id,
        "completed_by_vehicle": by_car,
    }
    assert read_jsonl(client, batch.output_file_id) == rows
    assert client.batches.retrieve(batch.id).request_counts == batch.request_counts


def store_rows(fleet: EmbeddedFleet, batch_id: str) -> list[Any]:
    store = open_store(fleet.store_url)
    try:
        return list(store.iter_requests(batch_id))
    finally:
        store.close()


def test_an_online_request_is_charged_to_its_customer_for_the_car_that_answered(
    fleet: EmbeddedFleet, client: OpenAI
) -> None:
    prices = Prices()
    before_entries = get(fleet, "/fleet/ledger?limit=10000", "operator")["data"]
    before = {e["id"] for e in before_entries}
    usage_before = get(fleet, "/fleet/usage", "customer")["data"]

    answer = client.embeddings.create(
        model="all-MiniLM-L6-v2", input=["a parked car answers", "and its owner is paid"]
    )
    tokens = answer.usage.prompt_tokens
    deadline = time.monotonic() + 15  # charges are posted by the ledger's flush, every second
    while True:
        ledger = get(fleet, "/fleet/ledger?limit=10000", "operator")
        new = [e for e in ledger["data"] if e["id"] not in before]
        if new or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    charges = [e for e in new if e["kind"] == "charge"]
    assert len(charges) == 1, new
    charge = charges[0]
    assert charge["id"].startswith("charge:online:run_")
    assert (charge["requests"], charge["input_tokens"], charge["output_tokens"]) == (1, tokens, 0)
    assert charge["vehicle_id"] in fleet.online_vehicles()
    assert charge["energy_j"] > 0  # the car metered the request and said so in its reply
    batch_keys = {e["api_key_id"] for e in before_entries if e["kind"] == "charge"}
    assert charge["api_key_id"] in batch_keys  # the same customer key as the batch's
    price = prices.charge(answer.model, 1, tokens, 0)
    amounts = {p["account"]: p["amount"] for p in charge["postings"]}
    assert amounts[f"customer:{charge['principal']}"] == -price
    assert ledger["total"] == 0
    # Charged to the key that asked: its usage grew by exactly this request.
    after = get(fleet, "/fleet/usage", "customer")["data"]
    assert sum(r["requests"] for r in after) - sum(r["requests"] for r in usage_before) == 1
    assert sum(r["cost"] for r in after) - sum(r["cost"] for r in usage_before) == price
