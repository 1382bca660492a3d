"""Our records in the JSON shapes of the OpenAI API (File, Batch, Model, list pages) and of
the fleet API (vehicles, leases, owner policies and the consent record)."""

from __future__ import annotations

from typing import Any

from idlefleet.coordinator.owners import PolicyVersion
from idlefleet.coordinator.store import BatchRecord, Enrolment, FileRecord, Lease, VehicleRecord
from idlefleet.models.catalog import ModelInfo


def file_json(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "status_details": None,
        "expires_at": None,
    }


def batch_json(batch: BatchRecord) -> dict[str, Any]:
    counts = batch.request_counts
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": batch.metadata,
        # Our extensions; the OpenAI SDK keeps unknown keys (``batch.model_extra``).
        "purpose": batch.purpose,
        "data_region": batch.data_region,
    }


def model_json(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by}


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def vehicle_json(
    vehicle: VehicleRecord,
    now: float,
    live_after: float,
    policy: PolicyVersion,
    refused_results: int = 0,
) -> dict[str, Any]:
    return {
        "id": vehicle.id,
        "hardware": vehicle.hardware,
        "models": list(vehicle.models),
        "status": vehicle.status,
        "status_reason": vehicle.status_reason,
        "policy_version": policy.version,
        "opted_in": policy.policy.opted_in,
        "online": vehicle.last_seen >= live_after,
        "last_seen_s_ago": round(now - vehicle.last_seen, 3),
        "registered_at": vehicle.registered_at,
        "completed_requests": vehicle.completed_requests,
        "refused_results": refused_results,
    }


def lease_json(lease: Lease, now: float) -> dict[str, Any]:
    return {
        "id": lease.id,
        "batch_id": lease.batch_id,
        "vehicle_id": lease.vehicle_id,
        "model": lease.model,
        "state": lease.state,
        "expires_in_s": round(lease.deadline - now, 3),
        "purpose": lease.purpose,
        "data_region": lease.data_region,
        "energy_j": lease.energy_j,
        "end_reason": lease.end_reason,
    }


def policy_json(version: PolicyVersion) -> dict[str, Any]:
    """A car's policy as the owner API shows it (version 0: never set, the defaults)."""
    return {
        "vehicle_id": version.vehicle_id,
        "version": version.version,
        "policy": version.policy.model_dump(mode="json"),
        "updated_at": version.created_at,
        "actor": version.actor,
    }


def consent_json(version: PolicyVersion) -> dict[str, Any]:
    """One entry of the consent record: who, when, which version, what was allowed."""
    return {
        "version": version.version,
        "opted_in": version.policy.opted_in,
        "purposes": list(version.policy.purposes),
        "data_regions": list(version.policy.data_regions),
        "actor": version.actor,
        "created_at": version.created_at,
    }


def enrolment_json(enrolment: Enrolment) -> dict[str, Any]:
    return {
        "object": "fleet.enrolment",
        "vehicle_id": enrolment.vehicle_id,
        "nkey": enrolment.nkey,
        "owner": enrolment.owner,
        "enrolled_at": enrolment.enrolled_at,
        "revoked_at": enrolment.revoked_at,
        "expires_at": enrolment.expires_at,
        "status": "revoked" if enrolment.revoked_at is not None else "enrolled",
    }
