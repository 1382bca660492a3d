"""Prometheus metrics of one coordinator replica, served at ``/metrics``.

Two kinds, so that any number of replicas add up:

* **Counters and histograms this replica moves as things happen**: requests and tokens done
  by workload (batch results it committed, online requests it answered), preemptions and
  failed units (cars handing leases back), requests whose lease expired, HTTP latency by
  route, and the cars' own figures (model runs, compute seconds, energy, how long a model took
  to stop), which reach the replica in heartbeats. Each happens on exactly one replica:
  ``sum without (instance)`` over replicas is the fleet's.
* **Gauges of the whole fleet read at scrape time** from the store (batches by status, queue
  depth, active leases, cars by status): the same on every replica, so take ``max``, not
  ``sum``. Read at most once per :data:`FLEET_CACHE_S`, with aggregate queries over indexes:
  a scrape costs the store O(live cars + unfinished batches) and nothing per idle car.

Nothing here is kept per car: labels are workloads, statuses, routes and reason codes, each a
small bounded set (a car cannot invent labels: see :func:`reason_label`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from idlefleet.coordinator.store import FleetCounts
from idlefleet.coordinator.store.base import BATCH_STATUSES
from idlefleet.protocol.messages import CarFigures

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLEET_CACHE_S = 2.0
"""The fleet's gauges are re-read from the store at most this often, however often
``/metrics`` is asked (it answers without a key)."""
MAX_REASONS = 32
"""Distinct preemption reasons kept as labels; later new ones count as ``other``."""
_REASON = re.compile(r"[a-z_]{1,32}")
CAR_STATUSES = ("idle", "working", "paused")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
"""A model run's stop time: the target is milliseconds, so the buckets are too."""


def reason_label(reason: str, known: set[str]) -> str:
    """The label of a hand-back reason (``preempted: not_parked, moving`` → ``not_parked``,
    ``error: …`` → ``error``): the car's first reason code, from a bounded set."""
    head, _, rest = reason.partition(":")
    code = rest.split(",")[0].strip() if head == "preempted" else head.strip()
    if not _REASON.fullmatch(code):
        return "other"
    if code not in known:
        if len(known) >= MAX_REASONS:
            return "other"
        known.add(code)
    return code


class Metrics:
    """One replica's registry: the hooks the coordinator calls, and the exposition."""

    def __init__(
        self,
        fleet: Callable[[], FleetCounts] | None = None,
        verification: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "idlefleet_requests",
            "Requests finished, by workload, path (batch or online) and outcome.",
            ["workload", "path", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "idlefleet_tokens",
            "Tokens of finished requests, by workload and direction (input or output).",
            ["workload", "direction"],
            registry=r,
        )
        self.handbacks = Counter(
            "idlefleet_lease_handbacks",
            "Leases a car handed back before finishing, by reason (a reason code such as "
            "not_parked is a preemption; error: the unit failed; shutdown: the agent stopped).",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            "idlefleet_lease_expired_requests",
            "Requests put back in the queue because their car went silent (lease expired).",
            registry=r,
        )
        self.http = Histogram(
            "idlefleet_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.car_runs = Counter(
            "idlefleet_car_model_runs", "Model runs cars finished or stopped.", registry=r
        )
        self.car_compute = Counter(
            "idlefleet_car_compute_seconds", "Seconds cars spent running models.", registry=r
        )
        self.car_energy = Counter(
            "idlefleet_car_energy_joules", "Energy cars metered for their model runs.", registry=r
        )
        self.car_preemptions = Counter(
            "idlefleet_car_preemptions",
            "Times a car had to stop computing while a model ran (the driver came back, the "
            "owner's policy changed).",
            registry=r,
        )
        self.car_stop = Histogram(
            "idlefleet_car_stop_seconds",
            "How long a running model took to stop once the car was told to stop.",
            buckets=STOP_BUCKETS,
            registry=r,
        )
        self._reasons: set[str] = set()
        self._lock = threading.Lock()
        self._fleet = _FleetCollector(fleet, clock) if fleet else None
        r.register(self._fleet or _Nothing())
        r.register(_VerificationCollector(verification) if verification else _Nothing())

    # -- hooks ---------------------------------------------------------------------------------
    def finished(
        self, workload: str, path: str, done: int, failed: int, tokens_in: int, tokens_out: int
    ) -> None:
        if done:
            self.requests.labels(workload, path, "completed").inc(done)
        if failed:
            self.requests.labels(workload, path, "failed").inc(failed)
        if tokens_in:
            self.tokens.labels(workload, "input").inc(tokens_in)
        if tokens_out:
            self.tokens.labels(workload, "output").inc(tokens_out)

    def handed_back(self, reason: str) -> None:
        with self._lock:
            label = reason_label(reason, self._reasons)
        self.handbacks.labels(label).inc()

    def car_figures(self, figures: CarFigures) -> None:
        """A heartbeat's figures: what that car did since its last acknowledged heartbeat."""
        self.car_runs.inc(figures.runs)
        self.car_compute.inc(figures.compute_s)
        self.car_energy.inc(figures.energy_j)
        self.car_preemptions.inc(figures.preemptions)
        for seconds in figures.stop_s:
            self.car_stop.observe(seconds)

    def fleet_counts(self) -> FleetCounts | None:
        """The fleet's counts as the last scrape read them (re-read if older than
        :data:`FLEET_CACHE_S`); None without a fleet reader."""
        return self._fleet.counts() if self._fleet is not None else None

    def total(self, metric: Counter, **labels: str) -> float:
        """The sum of a counter's samples whose labels include ``labels``."""
        return sum(
            sample.value
            for family in metric.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
            and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def by_label(self, metric: Counter, label: str) -> dict[str, float]:
        """A counter's totals by one label."""
        out: dict[str, float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels[label]
                    out[key] = out.get(key, 0.0) + sample.value
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Nothing(Collector):
    def collect(self) -> Iterator[Metric]:
        return iter(())


class _FleetCollector(Collector):
    """The fleet's gauges, read from the store at most every :data:`FLEET_CACHE_S`."""

    def __init__(self, read: Callable[[], FleetCounts], clock: Callable[[], float]) -> None:
        self._read = read
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, FleetCounts] | None = None

    def counts(self) -> FleetCounts:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached[0] >= FLEET_CACHE_S:
                self._cached = (now, self._read())
            return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        batches = GaugeMetricFamily(
            "idlefleet_batches", "Batches by status (the whole fleet's).", labels=["status"]
        )
        for status in sorted(set(BATCH_STATUSES) | counts.batches.keys()):
            batches.add_metric([status], counts.batches.get(status, 0))
        yield batches
        queue = GaugeMetricFamily(
            "idlefleet_queue_requests",
            "Requests of unfinished batches by state: pending (waiting for a car) or leased.",
            labels=["state"],
        )
        queue.add_metric(["pending"], counts.pending_requests)
        queue.add_metric(["leased"], counts.leased_requests)
        yield queue
        yield GaugeMetricFamily(
            "idlefleet_active_leases", "Leases cars hold now.", value=counts.active_leases
        )
        cars = GaugeMetricFamily(
            "idlefleet_cars",
            "Registered cars by status: idle, working, paused (heard from lately) or offline.",
            labels=["status"],
        )
        for status in sorted(set(CAR_STATUSES) | counts.live_cars.keys()):
            cars.add_metric([status], counts.live_cars.get(status, 0))
        cars.add_metric(["offline"], counts.offline_cars)
        yield cars


class _VerificationCollector(Collector):
    """The verifier's own counters (checks placed and answered, agreements, disagreements,
    canaries passed and failed, quarantines, ...) as one labelled counter."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "idlefleet_verification_events",
            "Verification of cars' results by event (agreed, disagreed, canary_passed, "
            "canary_failed, quarantined, ...).",
            labels=["event"],
        )
        for event, n in sorted(self._read().items()):
            family.add_metric([event], n)
        yield family


def route_of(scope: Mapping[str, Any]) -> str:
    """The route template a request matched (``/v1/batches/{batch_id}``), never the raw path
    (ids would make a label per object); ``unmatched`` for a path no route has."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
