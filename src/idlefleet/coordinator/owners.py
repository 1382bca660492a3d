"""Owners' policies for their cars: the coordinator's copy, its versions and the consent record.

The owner sets a policy (fleet API or CLI); every change is a new version appended to the store,
never an edit, so the history is the consent record: who changed what, and when. The coordinator
uses the current version in two ways only: it leases a car nothing while the owner has not opted
in, and only units whose purpose and data region the owner allows. Everything else in the
policy (charging, state-of-charge floor, hours, ...) is enforced by the car's policy guard,
which gets every new version pushed to it (see ``nats_service.push_policy``).

No I/O but the store. Parsed policies are cached per vehicle by version: a version never
changes once written, so the cache cannot go stale, only behind. Where being behind for a
moment is harmless (the version a heartbeat's ack carries) the cache answers alone
(:meth:`OwnerService.cached_version`); it is kept up with the store by :meth:`catch_up`, which
the coordinator calls every second for the versions other replicas appended. Where it matters
(leasing) the store is read (:meth:`OwnerService.refresh`, one query for many cars).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from idlefleet.coordinator.errors import Conflict, InternalError, InvalidRequest
from idlefleet.coordinator.store import PolicyRecord, Store
from idlefleet.protocol.policy import OwnerPolicy, PolicyUpdate
from idlefleet.protocol.subjects import is_valid_vehicle_id

__all__ = [
    "OwnerService",
    "PolicyVersion",
    "check_actor",
    "check_vehicle_id",
    "invalid_from",
    "validated_policy",
]

MAX_ACTOR_CHARS = 128
_CAS_ATTEMPTS = 5
_DEFAULT = OwnerPolicy()


@dataclass(frozen=True)
class PolicyVersion:
    """One version of a car's policy, parsed, with who set it and when (None for version 0)."""

    vehicle_id: str
    version: int
    policy: OwnerPolicy
    actor: str | None = None
    created_at: float | None = None

    def update(self) -> PolicyUpdate:
        """The wire form sent to the car."""
        return PolicyUpdate(version=self.version, policy=self.policy)


def check_vehicle_id(vehicle_id: str) -> str:
    if not is_valid_vehicle_id(vehicle_id):
        raise InvalidRequest(
            f"Invalid vehicle id {vehicle_id!r}: use 1-64 characters of letters, digits, "
            "'_' or '-'.",
            param="vehicle_id",
            code="invalid_value",
        )
    return vehicle_id


def check_actor(actor: str) -> str:
    if not 1 <= len(actor) <= MAX_ACTOR_CHARS or not actor.strip():
        raise InvalidRequest(
            f"Invalid 'actor': say who makes the change in 1-{MAX_ACTOR_CHARS} characters, "
            "e.g. 'owner:alice'.",
            param="actor",
            code="invalid_value",
        )
    return actor


class OwnerService:
    """Reads and appends owners' policies over a :class:`Store`."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._parsed: dict[str, PolicyVersion] = {}
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------
    def current(self, vehicle_id: str) -> PolicyVersion:
        """The car's current policy; version 0 with the cautious defaults if none was set."""
        return self._parse(self.store.current_policy(vehicle_id), vehicle_id)

    def current_version(self, vehicle_id: str) -> int:
        return self.current(vehicle_id).version

    def cached(self, vehicle_id: str) -> PolicyVersion | None:
        """The newest policy this replica knows for the car, without a store read."""
        with self._lock:
            return self._parsed.get(vehicle_id)

    def cached_version(self, vehicle_id: str) -> int | None:
        """The newest version this replica knows of, without a store read (None: none known)."""
        with self._lock:
            cached = self._parsed.get(vehicle_id)
        return None if cached is None else cached.version

    def refresh(self, vehicle_ids: Sequence[str]) -> dict[str, PolicyVersion]:
        """The current policies of these cars, read from the store in one query.

        On the store thread, once per store turn: the cache's lock is taken once for all the
        cars that did not change (a lock taken per car, against an event loop that takes it
        too, cost the GIL's hand-over time again and again)."""
        records = self.store.current_policies(set(vehicle_ids))
        out: dict[str, PolicyVersion] = {}
        with self._lock:
            for vid in vehicle_ids:
                cached = self._parsed.get(vid)
                record = records.get(vid)
                if cached is not None and (record is None or cached.version == record.version):
                    out[vid] = cached
        for vid in vehicle_ids:
            if vid not in out:
                out[vid] = self._parse(records.get(vid), vid)
        return out

    def versions(self, vehicle_ids: Sequence[str]) -> dict[str, int]:
        """Current version per car (0: none), read from the store in one query."""
        return {vid: p.version for vid, p in self.refresh(vehicle_ids).items()}

    def catch_up(self, since: float) -> int:
        """Take in the versions appended at or after ``since`` (by any replica); how many."""
        records = self.store.policies_since(since)
        for record in records:
            self._parse(record, record.vehicle_id)
        return len(records)

    def history(self, vehicle_id: str, limit: int = 1000) -> list[PolicyVersion]:
        """The consent record, oldest first (the latest ``limit`` versions)."""
        return [self._parse(r, vehicle_id) for r in self.store.policy_history(vehicle_id, limit)]

    def _parse(self, record: PolicyRecord | None, vehicle_id: str) -> PolicyVersion:
        if record is None:
            with self._lock:
                known = self._parsed.setdefault(vehicle_id, PolicyVersion(vehicle_id, 0, _DEFAULT))
            # A version appended meanwhile (this replica's own) is newer than the store's answer.
            return known
        with self._lock:
            cached = self._parsed.get(vehicle_id)
        if cached is not None and cached.version == record.version:
            return cached
        try:
            policy = OwnerPolicy.model_validate_json(record.policy_json)
        except ValidationError as exc:
            # Only this service writes policies, validated; a row that does not parse is a bug
            # or a tampered database. Failing loudly beats guessing what the owner wanted.
            raise InternalError(
                f"stored policy {record.version} of {vehicle_id} is invalid: {exc.errors()[:1]}",
                code="bad_stored_policy",
            ) from None
        parsed = PolicyVersion(vehicle_id, record.version, policy, record.actor, record.created_at)
        with self._lock:
            current = self._parsed.get(vehicle_id)
            if current is None or current.version < parsed.version:
                self._parsed[vehicle_id] = parsed
        return parsed

    # -- changing ------------------------------------------------------------------------------
    def set_policy(self, vehicle_id: str, policy: OwnerPolicy, actor: str) -> PolicyVersion:
        """Append ``policy`` as the car's next version (a whole policy replaces the last)."""
        check_vehicle_id(vehicle_id)
        check_actor(actor)
        record = self.store.append_policy(vehicle_id, policy.model_dump_json(), actor, self.clock())
        if record is None:  # no expected version was given, so the store must append
            raise InternalError("the store refused an unconditional policy append")
        return self._parse(record, vehicle_id)

    def set_consent(
        self,
        vehicle_id: str,
        opted_in: bool,
        actor: str,
        purposes: Sequence[str] | None = None,
        data_regions: Sequence[str] | None = None,
    ) -> PolicyVersion:
        """Append the current policy with opt-in (and, if given, purposes and regions) replaced.

        A compare-and-set on the version, retried on a concurrent change, so that a consent
        change never silently reverts another one made at the same moment (an opt-out
        overwritten by a stale opt-in would compute without consent).
        """
        check_vehicle_id(vehicle_id)
        check_actor(actor)
        changes: dict[str, object] = {"opted_in": opted_in}
        if purposes is not None:
            changes["purposes"] = list(purposes)
        if data_regions is not None:
            changes["data_regions"] = list(data_regions)
        for _ in range(_CAS_ATTEMPTS):
            base = self.current(vehicle_id)
            policy = validated_policy(base.policy.model_dump() | changes)
            record = self.store.append_policy(
                vehicle_id,
                policy.model_dump_json(),
                actor,
                self.clock(),
                expect_version=base.version,
            )
            if record is not None:
                return self._parse(record, vehicle_id)
        raise Conflict(
            f"The policy of {vehicle_id} kept changing while this consent was recorded; retry.",
            code="policy_conflict",
            param="vehicle_id",
        )


def validated_policy(fields: dict[str, object], prefix: str = "") -> OwnerPolicy:
    """Build an :class:`OwnerPolicy`, or raise :class:`InvalidRequest` naming field and problem."""
    try:
        return OwnerPolicy.model_validate(fields)
    except ValidationError as exc:
        raise invalid_from(exc, prefix) from None


def invalid_from(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """The first problem of a pydantic error as ``field.path: message`` (a 400)."""
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    param = ".".join(p for p in (prefix, path) if p) or None
    message = first["msg"]
    code = "invalid_json" if first["type"] == "json_invalid" else "invalid_value"
    return InvalidRequest(f"{param}: {message}" if param else message, param=param, code=code)
