"""The coordinator's side of the work protocol: one method per uplink message.

Each method takes the vehicle id (from the NATS subject, which per-vehicle permissions will
bind to the car's credentials) and a decoded message, and returns the reply message. No I/O
but the store; the NATS adapter (:mod:`idlefleet.coordinator.nats_service`) does the wire.

Consent gates leasing here: a car whose owner has not opted in gets no lease at all, and an
opted-in car only units whose purpose and data region its owner allows (the store filters).
The car's policy guard checks again; the coordinator never relies on it alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Literal

import numpy as np

from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.openai_format import embedding_body_json
from idlefleet.coordinator.owners import OwnerService
from idlefleet.coordinator.planner import UnitPolicy, unit_size
from idlefleet.coordinator.store import RequestResult, Store, VehicleRecord
from idlefleet.models.catalog import MODELS
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Heartbeat,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    WireError,
    WorkGrant,
    WorkItem,
    WorkRequest,
)
from idlefleet.protocol.policy import PolicyRequest, PolicyUpdate

NOT_OPTED_IN_RETRY_S = 5.0
"""How long a car that is not opted in waits before asking for work again."""


class WorkService:
    def __init__(
        self,
        store: Store,
        batches: BatchService,
        units: UnitPolicy | None = None,
        heartbeat_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        owners: OwnerService | None = None,
    ) -> None:
        self.store = store
        self.batches = batches
        self.units = units or UnitPolicy()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.owners = owners or OwnerService(store, clock)

    def active_vehicles(self) -> list[VehicleRecord]:
        """Vehicles heard from within three heartbeat intervals."""
        horizon = self.clock() - 3 * self.heartbeat_interval_s
        return [v for v in self.store.list_vehicles() if v.last_seen >= horizon]

    def register(self, vehicle_id: str, msg: RegisterRequest) -> RegisterReply:
        if msg.protocol_version != PROTOCOL_VERSION:
            return RegisterReply(
                accepted=False,
                error=WireError(
                    code="protocol_version",
                    message=f"coordinator speaks protocol {PROTOCOL_VERSION}, "
                    f"agent sent {msg.protocol_version}",
                ),
            )
        now = self.clock()
        existing = self.store.get_vehicle(vehicle_id)
        self.store.upsert_vehicle(
            VehicleRecord(
                id=vehicle_id,
                hardware=msg.hardware.model_dump(),
                models=tuple(msg.models),
                registered_at=existing.registered_at if existing else now,
                last_seen=now,
                status="idle",
            )
        )
        return RegisterReply(
            accepted=True,
            heartbeat_interval_s=self.heartbeat_interval_s,
            policy_version=self.owners.current_version(vehicle_id),
        )

    def heartbeat(self, vehicle_id: str, msg: Heartbeat) -> Ack:
        if not self.store.touch_vehicle(vehicle_id, self.clock(), msg.status, msg.reason):
            return Ack(ok=False, error=_not_registered(vehicle_id))
        # The car compares this with the version it enforces and fetches a newer one: the
        # catch-up path when a push (on a policy change) did not reach it.
        return Ack(policy_version=self.owners.current_version(vehicle_id))

    def policy(self, vehicle_id: str, msg: PolicyRequest) -> PolicyUpdate:
        """The owner's current policy for the car (version 0, opted out, if none was set)."""
        return self.owners.current(vehicle_id).update()

    def work(self, vehicle_id: str, msg: WorkRequest) -> WorkGrant:
        owner = self.owners.current(vehicle_id).policy
        if not owner.opted_in:
            if not self.store.touch_vehicle(vehicle_id, self.clock(), "paused", "not_opted_in"):
                return WorkGrant(error=_not_registered(vehicle_id))
            return WorkGrant(
                error=WireError(
                    code="not_opted_in",
                    message=f"the owner of {vehicle_id} has not opted in to computing; "
                    "no work is leased until they do",
                ),
                retry_after_s=NOT_OPTED_IN_RETRY_S,
            )
        if not self.store.touch_vehicle(vehicle_id, self.clock(), "working"):
            return WorkGrant(error=_not_registered(vehicle_id))
        models = [m for m in msg.models if m in MODELS]
        if not models:
            return WorkGrant(retry_after_s=5.0)
        active = max(1, len(self.active_vehicles()))
        lease = self.store.lease_unit(
            vehicle_id,
            f"lease_{uuid.uuid4().hex}",
            models,
            self.clock(),
            self.units.lease_seconds,
            lambda pending: unit_size(pending, active, msg.max_requests, self.units),
            purposes=owner.purposes,
            data_regions=owner.data_regions,
        )
        if lease is None:
            return WorkGrant(retry_after_s=0.5)
        return WorkGrant(
            lease_id=lease.id,
            batch_id=lease.batch_id,
            model=lease.model,
            purpose=lease.purpose,
            data_region=lease.data_region,
            lease_seconds=self.units.lease_seconds,
            items=[WorkItem(seq=i.seq, texts=list(i.texts)) for i in lease.items],
        )

    def results(self, vehicle_id: str, msg: ResultChunk) -> ResultAck:
        lease = self.store.get_lease(vehicle_id, msg.lease_id)
        if lease is None:
            return ResultAck(error=_unknown_lease(msg.lease_id))
        if msg.dim != MODELS[lease.model].dim:
            return ResultAck(
                error=WireError(
                    code="bad_results",
                    message=f"model {lease.model} has dimension {MODELS[lease.model].dim}, "
                    f"results have {msg.dim}",
                )
            )
        vectors = msg.vectors()
        problem = _check_vectors(vectors, msg.dim)
        if problem:
            return ResultAck(error=WireError(code="bad_results", message=problem))
        # Render each response body now, while the cars compute, rather than all at once in
        # finalisation when the batch is otherwise done (that used to be ~8% of a batch's time).
        formats = self.store.request_formats(lease.batch_id, msg.seqs)
        results = []
        row = 0
        for seq, n, tokens in zip(msg.seqs, msg.text_counts, msg.token_counts, strict=True):
            rows = vectors[row : row + n]
            row += n
            if seq not in formats:
                continue  # not a request of this batch: commit_results would ignore it anyway
            model, fmt = formats[seq]
            # Usage is per request: the total goes on the first vector, the sum is what counts.
            per_vector_tokens = [tokens] + [0] * (n - 1)
            encoding: Literal["float", "base64"] = "base64" if fmt == "base64" else "float"
            body = embedding_body_json(model, rows, per_vector_tokens, encoding)
            results.append(RequestResult(seq, rows.tobytes(), msg.dim, tokens, body))
        now = self.clock()
        outcome = self.store.commit_results(
            vehicle_id, msg.lease_id, results, now, self.units.lease_seconds, msg.energy_j
        )
        if outcome.unknown_lease:
            return ResultAck(error=_unknown_lease(msg.lease_id))
        if msg.failed_seqs:
            self.store.return_requests(vehicle_id, msg.lease_id, msg.failed_seqs)
        # A batch can only have run out of work when a unit ends (or a late answer arrives);
        # checking after every chunk would count the whole batch each time. The sweeper
        # checks every batch each second as well, so nothing waits on this shortcut.
        if outcome.lease_finished or not outcome.lease_active:
            self.batches.maybe_finalize(lease.batch_id)
        return ResultAck(
            committed=outcome.committed,
            duplicates=outcome.duplicates,
            lease_active=outcome.lease_active,
            lease_seconds=(outcome.deadline - now) if outcome.deadline else 0.0,
        )

    def release(self, vehicle_id: str, msg: Release) -> ReleaseAck:
        released = self.store.release_lease(
            vehicle_id, msg.lease_id, self.clock(), msg.reason, msg.energy_j
        )
        if released is None:
            return ReleaseAck(error=_unknown_lease(msg.lease_id))
        lease = self.store.get_lease(vehicle_id, msg.lease_id)
        if lease is not None:
            self.batches.maybe_finalize(lease.batch_id)
        return ReleaseAck(released=released)


def _check_vectors(vectors: np.ndarray, dim: int) -> str | None:
    """Sanity checks on untrusted results (full verification comes with replication)."""
    if not np.isfinite(vectors).all():
        return "vectors contain NaN or infinity"
    norms = np.linalg.norm(vectors, axis=1)
    if vectors.size and (np.abs(norms - 1.0) > 1e-3).any():
        return "vectors must be L2-normalised"
    return None


def _not_registered(vehicle_id: str) -> WireError:
    return WireError(code="not_registered", message=f"vehicle {vehicle_id} must register first")


def _unknown_lease(lease_id: str) -> WireError:
    return WireError(code="unknown_lease", message=f"lease {lease_id} is not held by this vehicle")
