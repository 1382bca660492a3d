"""``/metrics`` through the real stack: what a batch and an online request did, the fleet's
gauges, and the cars' own figures, which reach the coordinator in heartbeats over NATS."""

from __future__ import annotations

import time
import urllib.request

import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet
from tests.integration.conftest import read_jsonl, submit, wait_for

pytestmark = pytest.mark.integration

Sample = tuple[str, tuple[tuple[str, str], ...]]
BATCH_DONE = (
    "idlefleet_requests_total",
    (("outcome", "completed"), ("path", "batch"), ("workload", "embeddings")),
)
ONLINE_DONE = (
    "idlefleet_requests_total",
    (("outcome", "completed"), ("path", "online"), ("workload", "embeddings")),
)
TOKENS_IN = ("idlefleet_tokens_total", (("direction", "input"), ("workload", "embeddings")))
COMPLETED = ("idlefleet_batches", (("status", "completed"),))
CAR_FIGURES = (
    "idlefleet_car_model_runs_total",
    "idlefleet_car_compute_seconds_total",
    "idlefleet_car_energy_joules_total",
)


def scrape(fleet: EmbeddedFleet) -> dict[Sample, float]:
    """The replica's metrics, read as Prometheus does: no key."""
    with urllib.request.urlopen(fleet.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_batch_an_online_request_and_the_cars_work_show_in_the_metrics(
    fleet: EmbeddedFleet, client: OpenAI
) -> None:
    before = scrape(fleet)
    batch = wait_for(client, submit(client, batch_input(demo_texts(300))).id)
    assert batch.status == "completed" and batch.output_file_id is not None
    tokens = sum(
        row["response"]["body"]["usage"]["prompt_tokens"]
        for row in read_jsonl(client, batch.output_file_id)
    )
    answer = client.embeddings.create(model="all-MiniLM-L6-v2", input=["metrics, please"])

    time.sleep(2.5)  # the fleet's gauges are cached for 2 s
    after = scrape(fleet)

    def grew(sample: Sample) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    # Each result was committed once (a repeat is a duplicate, not counted).
    assert grew(BATCH_DONE) == 300
    assert grew(TOKENS_IN) == tokens + answer.usage.prompt_tokens
    assert grew(ONLINE_DONE) == 1
    assert grew(COMPLETED) == 1
    live = sum(after[("idlefleet_cars", (("status", s),))] for s in ("idle", "working", "paused"))
    assert live == len(fleet.online_vehicles()) == 2
    assert after[("idlefleet_queue_requests", (("state", "pending"),))] == 0
    routes = {
        dict(labels).get("route") for name, labels in after if name.startswith("idlefleet_http")
    }
    assert "/v1/batches/{batch_id}" in routes and "/v1/embeddings" in routes

    # The cars' figures arrive with their next heartbeats (every second here).
    deadline = time.monotonic() + 15
    while not all(grew((name, ())) > 0 for name in CAR_FIGURES):
        assert time.monotonic() < deadline, {n: grew((n, ())) for n in CAR_FIGURES}
        time.sleep(0.5)
        after = scrape(fleet)
    # Energy is the cars' metered power over their compute time: both came from the cars.
    assert grew(("idlefleet_car_energy_joules_total", ())) > 0
    assert grew(("idlefleet_car_model_runs_total", ())) >= 2  # at least the batch's units
