"""NATS subject names for the work protocol.

Every subject a vehicle touches carries its vehicle id, and the NATS server's permissions for
a car's key allow exactly these (`car_subjects`): it publishes requests on its uplink
(``idlefleet.v1.uplink.<car>.>``, served by coordinator replicas in one queue group) and
answers on its reply namespace (``idlefleet.v1.reply.<car>.>``); it receives requests on its
downlink (``idlefleet.v1.downlink.<car>.>``) and replies in its own inbox
(``_INBOX.<car>.>``, the car connects with that ``inbox_prefix``). A downlink request's reply
subject is in the car's reply namespace (`reply_inbox`), so a car can answer the cloud, and
only the cloud, without NATS's per-message response permissions, which a config reload resets.
"""

from __future__ import annotations

import functools
import re
import uuid
from enum import StrEnum

PREFIX = "idlefleet.v1"
COORDINATOR_QUEUE = "idlefleet-coordinators"

VEHICLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What a car id may be: one NATS subject token."""
_VEHICLE_ID = re.compile(VEHICLE_ID_PATTERN)


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


REPLY_PREFIX = f"{PREFIX}.reply"


def inbox_prefix(vehicle_id: str) -> str:
    """The inbox prefix a car connects with: replies to its requests come under it."""
    return f"_INBOX.{_checked(vehicle_id)}"


def reply_inbox(vehicle_id: str) -> str:
    """A fresh reply subject for one downlink request to ``vehicle_id``."""
    return f"{REPLY_PREFIX}.{_checked(vehicle_id)}.{uuid.uuid4().hex}"


def car_subjects(vehicle_id: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects a car's credentials allow, and nothing else."""
    vid = _checked(vehicle_id)
    publish = [f"{PREFIX}.uplink.{vid}.>", f"{REPLY_PREFIX}.{vid}.>"]
    subscribe = [f"{PREFIX}.downlink.{vid}.>", f"_INBOX.{vid}.>"]
    return publish, subscribe


def is_valid_vehicle_id(vehicle_id: str) -> bool:
    """Whether ``vehicle_id`` is one NATS subject token: letters, digits, ``_``, ``-``."""
    return bool(_VEHICLE_ID.fullmatch(vehicle_id))  # not match: "$" accepts a final "\n"


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
