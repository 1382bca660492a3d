"""Which cars are alive, kept in memory and written to the store in batches.

A heartbeat is the most frequent message in the fleet (every car, every few seconds) and says
little that must survive a crash: that the car was alive at ``t`` and what it was doing. So a
heartbeat updates this registry only, and the coordinator's flusher writes the rows that
changed (:meth:`VehicleRegistry.take_unwritten`) in one transaction a second. A car's row is
rewritten when its status changes, or when the stored ``last_seen`` is older than
``write_every_s``; the store is therefore at most that far behind, which is well inside the
liveness horizon of three heartbeat intervals. With several replicas each one sees only its
share of a car's heartbeats; the store's newest-wins write merges them, and each replica pulls
the cars seen recently by the others (:meth:`VehicleRegistry.merge`).

Ids that are not registered are remembered for a while too (:meth:`VehicleRegistry.is_unknown`),
so a stream of messages from a car that never registered costs one store read, not one per
message. No I/O here: the NATS edge and the flusher call in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from idlefleet.coordinator.store import VehicleLiveness, VehicleRecord, VehicleSeen

__all__ = ["LiveVehicle", "VehicleRegistry"]

UNKNOWN_TTL_S = 5.0
"""How long an id found unregistered stays known as such (it may register at another replica)."""
MAX_UNKNOWN = 100_000
"""Bound on remembered unregistered ids, so that made-up ids cannot grow memory for ever."""


@dataclass
class LiveVehicle:
    """What this replica knows of one car's liveness."""

    id: str
    models: tuple[str, ...]
    last_seen: float
    status: str
    status_reason: str | None = None
    written_seen: float = 0.0
    """``last_seen`` as last written to (or read from) the store."""
    written_status: tuple[str, str | None] = ("", None)
    """``(status, status_reason)`` as last written to (or read from) the store."""
    location: tuple[float, float] | None = None
    """Where the car last said it is (rounded by the car; kept in memory only, for the map)."""

    def needs_writing(self, write_every_s: float) -> bool:
        return (self.status, self.status_reason) != self.written_status or (
            self.last_seen - self.written_seen >= write_every_s
        )


ASKED_FOR_WORK = "asked_for_work"
"""A sighting from a work request: the car's gate allows computing (agents ask only then)."""


class VehicleRegistry:
    """In-memory liveness of the cars this replica hears from; see the module docstring."""

    def __init__(self, write_every_s: float = 5.0) -> None:
        self.write_every_s = write_every_s
        self._cars: dict[str, LiveVehicle] = {}
        self._unwritten: set[str] = set()
        self._unknown: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._cars)

    def get(self, vehicle_id: str) -> LiveVehicle | None:
        return self._cars.get(vehicle_id)

    # -- what the store says -------------------------------------------------------------------
    def registered(self, record: VehicleRecord) -> None:
        """A car registered (its record is already durable)."""
        self._unknown.pop(record.id, None)
        self._cars[record.id] = LiveVehicle(
            record.id,
            record.models,
            record.last_seen,
            record.status,
            record.status_reason,
            written_seen=record.last_seen,
            written_status=(record.status, record.status_reason),
        )
        self._unwritten.discard(record.id)

    def merge(self, rows: Iterable[VehicleLiveness]) -> None:
        """Take in what the store knows (cars other replicas heard from); newest wins."""
        for row in rows:
            self._unknown.pop(row.id, None)
            car = self._cars.get(row.id)
            if car is None:
                self._cars[row.id] = LiveVehicle(
                    row.id,
                    row.models,
                    row.last_seen,
                    row.status,
                    row.status_reason,
                    written_seen=row.last_seen,
                    written_status=(row.status, row.status_reason),
                )
                continue
            car.models = row.models
            if row.last_seen > car.last_seen:
                car.last_seen, car.status, car.status_reason = (
                    row.last_seen,
                    row.status,
                    row.status_reason,
                )
            if row.last_seen >= car.written_seen:
                car.written_seen = row.last_seen
                car.written_status = (row.status, row.status_reason)

    def mark_unknown(self, vehicle_id: str, now: float) -> None:
        """The store has no such car: answer ``not_registered`` without asking again for a bit."""
        if len(self._unknown) >= MAX_UNKNOWN:
            self._unknown.clear()
        self._unknown[vehicle_id] = now + UNKNOWN_TTL_S

    def is_unknown(self, vehicle_id: str, now: float) -> bool:
        until = self._unknown.get(vehicle_id)
        if until is None:
            return False
        if until < now:
            del self._unknown[vehicle_id]
            return False
        return True

    # -- what the cars say ---------------------------------------------------------------------
    def seen(
        self, vehicle_id: str, now: float, status: str | None = None, reason: str | None = None
    ) -> bool:
        """Record a message from a car; False if it is not known here (look it up first).

        ``status`` None keeps the status; ``ASKED_FOR_WORK`` (a work request) says the car may
        compute, so a car this replica holds as paused is idle again (its heartbeats go to any
        replica: the one that heard it pause may not hear it resume for a few intervals);
        otherwise status and reason are replaced, a None reason clearing the old.
        """
        car = self._cars.get(vehicle_id)
        if car is None:
            return False
        if now > car.last_seen:
            car.last_seen = now
        if status == ASKED_FOR_WORK:
            if car.status == "paused":
                car.status, car.status_reason = "idle", None
        elif status is not None:
            car.status, car.status_reason = status, reason
        if car.needs_writing(self.write_every_s):
            self._unwritten.add(vehicle_id)
        return True

    def take_unwritten(self) -> list[VehicleSeen]:
        """The rows to write now; they count as written (put them back with :meth:`unwrite`)."""
        rows = []
        for vehicle_id in self._unwritten:
            car = self._cars[vehicle_id]
            rows.append(VehicleSeen(car.id, car.last_seen, car.status, car.status_reason))
            car.written_seen, car.written_status = car.last_seen, (car.status, car.status_reason)
        self._unwritten.clear()
        return rows

    def unwrite(self, rows: Iterable[VehicleSeen]) -> None:
        """A flush failed: write these rows again next time."""
        for row in rows:
            car = self._cars.get(row.vehicle_id)
            if car is not None:
                car.written_seen, car.written_status = 0.0, ("", None)
                self._unwritten.add(row.vehicle_id)

    # -- questions -----------------------------------------------------------------------------
    def live(self, since: float) -> list[LiveVehicle]:
        """Cars seen at or after ``since`` (O(cars known here): for rare callers only)."""
        return [car for car in self._cars.values() if car.last_seen >= since]
