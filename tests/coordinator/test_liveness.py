"""The in-memory liveness registry: what a heartbeat changes, and what reaches the store."""

from __future__ import annotations

from idlefleet.coordinator.liveness import ASKED_FOR_WORK, UNKNOWN_TTL_S, VehicleRegistry
from idlefleet.coordinator.store import VehicleLiveness, VehicleRecord, VehicleSeen

NOW = 1_700_000_000.0


def registered(registry: VehicleRegistry, vehicle_id: str = "car-1", now: float = NOW) -> None:
    registry.registered(VehicleRecord(vehicle_id, {}, ("m",), now, now, "idle"))


def test_a_heartbeat_of_an_unknown_car_is_not_recorded() -> None:
    registry = VehicleRegistry()

    assert registry.seen("car-1", NOW, "idle") is False
    assert registry.take_unwritten() == []


def test_a_status_change_is_written_at_the_next_flush_and_only_once() -> None:
    registry = VehicleRegistry(write_every_s=5)
    registered(registry)

    registry.seen("car-1", NOW + 1, "paused", "not_charging")
    first = registry.take_unwritten()
    registry.seen("car-1", NOW + 2, "paused", "not_charging")
    second = registry.take_unwritten()

    assert first == [VehicleSeen("car-1", NOW + 1, "paused", "not_charging")]
    assert second == []  # same status, and the stored last_seen is recent enough


def test_last_seen_alone_is_rewritten_only_every_write_interval() -> None:
    registry = VehicleRegistry(write_every_s=5)
    registered(registry)

    writes = []
    for t in range(1, 21):  # a heartbeat a second for 20 s
        registry.seen("car-1", NOW + t, "idle")
        writes += registry.take_unwritten()

    assert [w.last_seen - NOW for w in writes] == [5, 10, 15, 20]


def test_a_work_request_refreshes_last_seen_but_keeps_the_status() -> None:
    registry = VehicleRegistry()
    registered(registry)
    registry.seen("car-1", NOW + 1, "paused", "not_parked")

    registry.seen("car-1", NOW + 2)

    car = registry.get("car-1")
    assert car is not None and (car.last_seen, car.status) == (NOW + 2, "paused")


def test_a_work_request_says_a_car_held_as_paused_may_compute_again() -> None:
    """Heartbeats go to any replica: the one that heard "paused" may not hear the resume."""
    registry = VehicleRegistry()
    registered(registry)
    registered(registry, "car-2")
    registry.seen("car-1", NOW + 1, "paused", "not_parked")
    registry.seen("car-2", NOW + 1, "working")

    registry.seen("car-1", NOW + 2, ASKED_FOR_WORK)
    registry.seen("car-2", NOW + 2, ASKED_FOR_WORK)

    one, two = registry.get("car-1"), registry.get("car-2")
    assert one is not None and (one.status, one.status_reason) == ("idle", None)
    assert two is not None and two.status == "working"  # not paused: kept as it is


def test_a_failed_flush_is_written_again() -> None:
    registry = VehicleRegistry()
    registered(registry)
    registry.seen("car-1", NOW + 1, "working")
    rows = registry.take_unwritten()

    registry.unwrite(rows)

    assert registry.take_unwritten() == rows


def test_merging_the_store_keeps_the_newer_of_both() -> None:
    registry = VehicleRegistry()
    registered(registry)
    registry.seen("car-1", NOW + 10, "working")

    registry.merge(
        [
            VehicleLiveness("car-1", ("m",), NOW + 5, "idle"),  # older than memory
            VehicleLiveness("car-2", ("m", "n"), NOW + 7, "paused", "not_charging"),  # new here
        ]
    )

    one, two = registry.get("car-1"), registry.get("car-2")
    assert one is not None and (one.last_seen, one.status) == (NOW + 10, "working")
    assert two is not None and (two.models, two.status_reason) == (("m", "n"), "not_charging")
    assert [c.id for c in registry.live(NOW + 6)] == ["car-1", "car-2"]


def test_an_unregistered_id_is_remembered_for_a_while_then_forgotten() -> None:
    registry = VehicleRegistry()

    registry.mark_unknown("ghost", NOW)

    assert registry.is_unknown("ghost", NOW + UNKNOWN_TTL_S - 0.1)
    assert not registry.is_unknown("ghost", NOW + UNKNOWN_TTL_S + 0.1)
    registry.mark_unknown("ghost", NOW)
    registered(registry, "ghost")
    assert not registry.is_unknown("ghost", NOW)
