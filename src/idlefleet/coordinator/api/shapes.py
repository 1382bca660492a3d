"""Our records in the JSON shapes of the OpenAI API (File, Batch, Model, list pages)."""

from __future__ import annotations

from typing import Any

from idlefleet.coordinator.store import BatchRecord, FileRecord, VehicleRecord
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


def vehicle_json(vehicle: VehicleRecord, now: float, live_after: float) -> dict[str, Any]:
    return {
        "id": vehicle.id,
        "hardware": vehicle.hardware,
        "models": list(vehicle.models),
        "status": vehicle.status,
        "online": vehicle.last_seen >= live_after,
        "last_seen_s_ago": round(now - vehicle.last_seen, 3),
        "registered_at": vehicle.registered_at,
        "completed_requests": vehicle.completed_requests,
    }
