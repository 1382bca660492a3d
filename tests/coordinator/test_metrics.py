"""One replica's Prometheus metrics (``coordinator/metrics.py``), read back through the text
exposition as Prometheus would read it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from idlefleet.coordinator.metrics import (
    FLEET_CACHE_S,
    MAX_REASONS,
    Metrics,
    reason_label,
)
from idlefleet.coordinator.store import FleetCounts
from idlefleet.coordinator.store.base import BATCH_STATUSES
from idlefleet.protocol.messages import CarFigures

COUNTS = FleetCounts(
    batches={"in_progress": 2, "completed": 5},
    pending_requests=120,
    leased_requests=30,
    active_leases=4,
    live_cars={"working": 3, "paused": 1},
    offline_cars=7,
)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition by (name, sorted labels)."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_finished_requests_and_tokens_are_counted_by_workload_path_and_direction() -> None:
    m = Metrics()
    m.finished("embeddings", "batch", 300, 0, 4200, 0)
    m.finished("embeddings", "batch", 20, 0, 100, 0)
    m.finished("chat", "online", 1, 0, 12, 40)
    m.finished("chat", "online", 0, 1, 0, 0)

    got = samples(m)
    req = "idlefleet_requests_total"
    assert (
        got[(req, (("outcome", "completed"), ("path", "batch"), ("workload", "embeddings")))] == 320
    )
    assert got[(req, (("outcome", "completed"), ("path", "online"), ("workload", "chat")))] == 1
    assert got[(req, (("outcome", "failed"), ("path", "online"), ("workload", "chat")))] == 1
    tok = "idlefleet_tokens_total"
    assert got[(tok, (("direction", "input"), ("workload", "embeddings")))] == 4300
    assert got[(tok, (("direction", "output"), ("workload", "chat")))] == 40
    assert (tok, (("direction", "output"), ("workload", "embeddings"))) not in got


def test_a_hand_back_is_labelled_by_the_cars_first_reason_code() -> None:
    known: set[str] = set()
    assert reason_label("preempted: not_parked, moving, speed", known) == "not_parked"
    assert reason_label("error: the model failed to load", known) == "error"
    assert reason_label("shutdown", known) == "shutdown"
    assert reason_label("preempted: Ünïcode ☃", known) == "other"
    assert reason_label("x" * 40, known) == "other"
    assert known == {"not_parked", "error", "shutdown"}


def test_a_car_cannot_make_more_than_max_reasons_labels() -> None:
    m = Metrics()
    for i in range(MAX_REASONS + 10):
        m.handed_back(f"preempted: reason_{chr(97 + i % 26)}{chr(97 + i // 26)}")
    labels = {dict(k[1])["reason"] for k in samples(m) if k[0] == "idlefleet_lease_handbacks_total"}
    assert len(labels) == MAX_REASONS + 1 and "other" in labels
    total = sum(v for k, v in samples(m).items() if k[0] == "idlefleet_lease_handbacks_total")
    assert total == MAX_REASONS + 10  # none lost, the rest counted as other


def test_car_figures_fill_the_counters_and_the_stop_histogram() -> None:
    m = Metrics()
    m.car_figures(CarFigures(runs=3, compute_s=1.5, energy_j=150.0, preemptions=1, stop_s=[0.004]))
    m.car_figures(CarFigures(runs=2, compute_s=0.5, energy_j=50.0, stop_s=[0.02, 0.3]))

    got = samples(m)
    assert got[("idlefleet_car_model_runs_total", ())] == 5
    assert got[("idlefleet_car_compute_seconds_total", ())] == 2.0
    assert got[("idlefleet_car_energy_joules_total", ())] == 200.0
    assert got[("idlefleet_car_preemptions_total", ())] == 1
    assert got[("idlefleet_car_stop_seconds_count", ())] == 3
    assert got[("idlefleet_car_stop_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("idlefleet_car_stop_seconds_bucket", (("le", "0.025"),))] == 2
    assert got[("idlefleet_car_stop_seconds_sum", ())] == 0.324


def test_fleet_gauges_show_every_status_and_are_read_at_most_once_per_cache_period() -> None:
    reads: list[float] = []
    now = [100.0]

    def fleet() -> FleetCounts:
        reads.append(now[0])
        return COUNTS

    m = Metrics(fleet=fleet, clock=lambda: now[0])
    got = samples(m)
    for status in BATCH_STATUSES:
        assert got[("idlefleet_batches", (("status", status),))] == COUNTS.batches.get(status, 0)
    assert got[("idlefleet_queue_requests", (("state", "pending"),))] == 120
    assert got[("idlefleet_queue_requests", (("state", "leased"),))] == 30
    assert got[("idlefleet_active_leases", ())] == 4
    assert got[("idlefleet_cars", (("status", "working"),))] == 3
    assert got[("idlefleet_cars", (("status", "idle"),))] == 0
    assert got[("idlefleet_cars", (("status", "offline"),))] == 7

    samples(m)
    m.fleet_counts()
    assert len(reads) == 1  # scraped three times within the cache period: one store read
    now[0] += FLEET_CACHE_S
    samples(m)
    assert len(reads) == 2


def test_verification_events_are_exported_as_one_labelled_counter() -> None:
    events = {"agreed": 40, "disagreed": 2, "quarantined": 1}
    m = Metrics(verification=lambda: events)
    got = samples(m)
    for event, n in events.items():
        assert got[("idlefleet_verification_events_total", (("event", event),))] == n
