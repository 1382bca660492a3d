"""What the dashboard shows, in one answer (``GET /fleet/overview``), scoped by role.

An operator sees the whole fleet: cars by state and hardware class, where they are parked,
their verification state, the latest batches with their progress, throughput and hand-backs
since this replica started, and what every owner has earned. An owner sees only their own cars
and their own earnings (no batches: those are customers').

What it costs, polled every couple of seconds by each open dashboard: the cars come from this
replica's memory (the cars it heard from lately; its registry), the counts from the store's
aggregate reads shared with ``/metrics`` (cached), the batches from the newest page of the
batch index, and the earnings from account balances cached for :data:`MONEY_CACHE_S`. The
car list is capped at :data:`MAX_CARS` (working cars first, then paused, then idle): with a
million cars the counts stay exact and the map shows a sample.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from idlefleet.coordinator.liveness import LiveVehicle
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.store import BatchRecord, FleetCounts
from idlefleet.coordinator.work import WorkService

MAX_CARS = 2000
"""Cars listed (and drawn on the map) at most; the counts cover every car."""
MAX_BATCHES = 12
"""The newest batches shown with their progress."""
MONEY_CACHE_S = 10.0
"""Account balances (a sum over every posting) are read at most this often."""
_STATUS_ORDER = {"working": 0, "paused": 1, "idle": 2, "offline": 3}


@dataclass(frozen=True)
class CarView:
    """One car as the dashboard draws it."""

    id: str
    status: str
    """``working``, ``idle``, ``paused`` or ``offline``."""
    reason: str | None
    hardware: str
    """The hardware class: accelerator, execution provider, precision."""
    trust: str
    """``new``, ``trusted`` or ``quarantined``."""
    location: tuple[float, float] | None
    last_seen_s_ago: float | None
    """None: never heard from."""

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "reason": self.reason,
            "hardware": self.hardware,
            "trust": self.trust,
            "location": list(self.location) if self.location else None,
            "last_seen_s_ago": None
            if self.last_seen_s_ago is None
            else round(self.last_seen_s_ago, 1),
        }


def hardware_label(hardware: Mapping[str, Any]) -> str:
    parts = [hardware.get("accelerator"), hardware.get("provider"), hardware.get("precision")]
    label = " · ".join(str(p).removesuffix("ExecutionProvider") for p in parts if p)
    return label or "unknown"


def car_counts(cars: Iterable[CarView]) -> dict[str, Any]:
    """Cars by status, hardware class and trust state."""
    cars = list(cars)
    return {
        "by_status": dict(Counter(c.status for c in cars)),
        "by_hardware": dict(Counter(c.hardware for c in cars)),
        "by_trust": dict(Counter(c.trust for c in cars)),
    }


def batch_json(batch: BatchRecord) -> dict[str, Any]:
    counts = batch.request_counts
    return {
        "id": batch.id,
        "status": batch.status,
        "endpoint": batch.endpoint,
        "created_at": batch.created_at,
        "total": counts.total,
        "completed": counts.completed,
        "failed": counts.failed,
        "progress": round((counts.completed + counts.failed) / counts.total, 4)
        if counts.total
        else 0.0,
    }


def owners_money(balances: Mapping[str, int]) -> list[dict[str, Any]]:
    """Per owner: ``payable`` (verified earnings) and ``escrow`` (waiting for verification)."""
    owners: dict[str, dict[str, Any]] = {}
    for account, amount in balances.items():
        kind, _, owner = account.partition(":")
        if kind in ("owner", "escrow") and owner:
            row = owners.setdefault(owner, {"owner": owner, "payable": 0, "escrow": 0})
            row["payable" if kind == "owner" else "escrow"] += amount
    return sorted(owners.values(), key=lambda r: r["owner"])


class Overview:
    """Builds ``/fleet/overview`` answers (called on a worker thread)."""

    def __init__(
        self,
        work: WorkService,
        metrics: Metrics,
        currency: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.work = work
        self.metrics = metrics
        self.currency = currency
        self.clock = clock
        self._lock = threading.Lock()
        self._money: tuple[float, dict[str, int]] | None = None

    def operator(self) -> dict[str, Any]:
        now = self.clock()
        cars = self._cars(self._live(now), now)
        counts = self.metrics.fleet_counts() or FleetCounts({}, 0, 0, 0, {}, 0)
        batches = self.work.store.list_batches(MAX_BATCHES)
        return {
            "role": "operator",
            "at": now,
            "currency": self.currency(),
            "fleet": {
                "cars": {**counts.live_cars, "offline": counts.offline_cars},
                "batches": counts.batches,
                "queue": {"pending": counts.pending_requests, "leased": counts.leased_requests},
                "active_leases": counts.active_leases,
            },
            "cars": [c.json() for c in cars],
            "listed": car_counts(cars),
            "batches": [batch_json(b) for b in batches],
            "work": self._work(),
            "money": {"owners": owners_money(self._balances(now))},
        }

    def owner(self, owner: str) -> dict[str, Any]:
        now = self.clock()
        store = self.work.store
        ids = [e.vehicle_id for e in store.enrolments(owner) if e.revoked_at is None]
        live_since = now - self.work.live_horizon_s
        known = self._known(ids)
        stored = store.vehicle_liveness([i for i in ids if i not in known])
        for vehicle_id, row in stored.items():
            known[vehicle_id] = LiveVehicle(
                row.id, row.models, row.last_seen, row.status, row.status_reason
            )
        cars = self._cars(
            [
                known.get(i) or LiveVehicle(i, (), 0.0, "idle")
                for i in ids  # enrolled, never connected: offline
            ],
            now,
            live_since,
        )
        mine = {k: v for k, v in self._balances(now).items() if k.endswith(f":{owner}")}
        return {
            "role": "owner",
            "owner": owner,
            "at": now,
            "currency": self.currency(),
            "fleet": {"cars": car_counts(cars)["by_status"]},
            "cars": [c.json() for c in cars],
            "listed": car_counts(cars),
            "money": {"owners": owners_money(mine)},
        }

    # -- parts ---------------------------------------------------------------------------------
    def _live(self, now: float) -> list[LiveVehicle]:
        return self.work.live_cars(now - self.work.live_horizon_s)

    def _known(self, ids: Iterable[str]) -> dict[str, LiveVehicle]:
        return {c.id: c for c in self.work.known_cars(ids)}

    def _cars(
        self, live: Iterable[LiveVehicle], now: float, live_since: float | None = None
    ) -> list[CarView]:
        verifier = self.work.verifier
        views = []
        for car in live:
            online = live_since is None or car.last_seen >= live_since
            status = car.status if online else "offline"
            if verifier is not None:
                profile = verifier.profile(car.id)
                record = verifier.trust(car.id)
                hardware = hardware_label(profile.hardware)
                trust = (
                    "quarantined"
                    if record.quarantined
                    else ("trusted" if record.trusted(verifier.policy) else "new")
                )
            else:
                record_of = self.work.store.get_vehicle(car.id)
                hardware = hardware_label(record_of.hardware if record_of else {})
                trust = "unverified"
            views.append(
                CarView(
                    car.id,
                    status,
                    car.status_reason if status == "paused" else None,
                    hardware,
                    trust,
                    car.location,
                    now - car.last_seen if car.last_seen else None,
                )
            )
        views.sort(key=lambda c: (_STATUS_ORDER.get(c.status, 9), c.id))
        return views[:MAX_CARS]

    def _work(self) -> dict[str, Any]:
        """This replica's counters since it started (the page turns them into rates)."""
        m = self.metrics
        return {
            "requests": m.total(m.requests, outcome="completed"),
            "tokens": m.total(m.tokens),
            "handbacks": m.by_label(m.handbacks, "reason"),
            "preemptions": m.total(m.car_preemptions),
            "verification": {
                k: v
                for k, v in (self.work.verifier.events() if self.work.verifier else {}).items()
                if k in ("agreed", "disagreed", "canary_passed", "canary_failed", "quarantined")
            },
        }

    def _balances(self, now: float) -> dict[str, int]:
        with self._lock:
            if self._money is None or now - self._money[0] >= MONEY_CACHE_S:
                self._money = (now, self.work.store.balances())
            return self._money[1]
