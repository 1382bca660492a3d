"""NATS subject names for the work protocol.

Every subject a vehicle touches carries its vehicle id, so that per-vehicle NATS permissions
("car X may publish only to idlefleet.v1.uplink.X.>" and subscribe only to
"idlefleet.v1.downlink.X.>") can be switched on later without a redesign. Uplink subjects are
requests from a car to the cloud (served by coordinator replicas in one queue group); downlink
subjects are requests from the cloud to one car (the car answers on its one outbound connection).
"""

from __future__ import annotations

import functools
import re
from enum import StrEnum

PREFIX = "idlefleet.v1"
COORDINATOR_QUEUE = "idlefleet-coordinators"

_VEHICLE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Uplink(StrEnum):
    """Requests a vehicle sends to the coordinator (request/reply)."""

    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    WORK = "work"
    RESULTS = "results"
    RELEASE = "release"
    PROGRESS = "progress"
    """Report work in progress (``Progress``): kept for the next car, extends the lease."""
    POLICY = "policy"
    """Fetch the owner's current policy (after a heartbeat shows a newer version)."""


class Downlink(StrEnum):
    """Requests the coordinator sends to one vehicle (request/reply)."""

    RUN = "run"
    """Run an online request at once (``RunRequest`` -> ``RunReply``)."""
    POLICY = "policy"
    """Push a changed owner policy to the car at once (opt-out must not wait for a poll)."""


WORK_AVAILABLE = f"{PREFIX}.cloud.work_available"
"""Coordinator replicas tell each other that requests entered the queue (wakes long polls)."""


def is_valid_vehicle_id(vehicle_id: str) -> bool:
    """Whether ``vehicle_id`` is one NATS subject token: letters, digits, ``_``, ``-``."""
    return bool(_VEHICLE_ID.match(vehicle_id))


def _checked(vehicle_id: str) -> str:
    if not is_valid_vehicle_id(vehicle_id):
        raise ValueError(
            f"vehicle id {vehicle_id!r} must be 1-64 characters of letters, digits, '_' or '-'"
        )
    return vehicle_id


def uplink(vehicle_id: str, verb: Uplink) -> str:
    """Subject on which ``vehicle_id`` sends ``verb`` to the coordinator."""
    return f"{PREFIX}.uplink.{_checked(vehicle_id)}.{verb.value}"


def downlink(vehicle_id: str, verb: Downlink) -> str:
    """Subject on which the coordinator sends ``verb`` to ``vehicle_id``."""
    return f"{PREFIX}.downlink.{_checked(vehicle_id)}.{verb.value}"


def uplink_wildcard(verb: Uplink) -> str:
    """Subscription subject covering ``verb`` from every vehicle."""
    return f"{PREFIX}.uplink.*.{verb.value}"


@functools.lru_cache(maxsize=131_072)
def parse_uplink(subject: str) -> tuple[str, Uplink]:
    """Split an uplink subject into (vehicle id, verb); ``ValueError`` if it is not one.

    Cached: a car's subjects repeat with every message, and this runs for each one."""
    parts = subject.split(".")
    if len(parts) != 5 or ".".join(parts[:3]) != f"{PREFIX}.uplink":
        raise ValueError(f"not an uplink subject: {subject!r}")
    try:
        verb = Uplink(parts[4])
    except ValueError:
        raise ValueError(f"unknown uplink verb {parts[4]!r} in {subject!r}") from None
    return _checked(parts[3]), verb
