"""What the coordinator's OpenAPI description (``/openapi.json``) says that FastAPI cannot infer.

Several routes parse their bodies themselves (to answer OpenAI's errors exactly) and build their
responses as plain dicts (``shapes.py``), so FastAPI alone would describe them as taking nothing
and returning any object, with a 422 that is never sent. This module states the contract
instead: the Bearer key every route but the open ones needs, the error body of every refusal
(``4XX``: OpenAI's ``{"error": {...}}``), the request bodies of the online endpoints, the File
and Batch objects, the content types that are not JSON, and the links a client follows (upload
a file, then create a batch from it; enrol a car, then set its policy). Clients and generated
SDKs read it; the API fuzz tests (``tests/coordinator/api/test_openapi_fuzz.py``) hold the app
to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path
from fastapi.routing import APIRoute
from pydantic import BaseModel

from idlefleet.coordinator.api.auth import OPEN_PATHS
from idlefleet.coordinator.store.base import BatchStatus
from idlefleet.models.catalog import MODELS
from idlefleet.protocol.policy import DataRegion, Purpose
from idlefleet.protocol.subjects import VEHICLE_ID_PATTERN

__all__ = [
    "BATCH",
    "CREATED_BATCH",
    "ENROLMENT",
    "ERRORS",
    "FILE",
    "FILE_CONTENT",
    "METADATA",
    "ONLINE_ERRORS",
    "UPLOADED_FILE",
    "VehicleId",
    "choices",
    "install",
    "online_body",
    "operation_id",
]


def choices(values: Iterable[str]) -> dict[str, Any]:
    """A ``json_schema_extra`` that documents the values a route checks itself."""
    return {"enum": list(values)}


METADATA: dict[str, Any] = {
    "maxProperties": 16,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
}
"""A batch's ``metadata`` (checked by ``BatchService``): OpenAI's limits."""

VehicleId = Annotated[str, Path(json_schema_extra={"pattern": VEHICLE_ID_PATTERN, "maxLength": 64})]
"""A car id in a path (checked by ``owners.check_vehicle_id``, which names the rule)."""

BEARER = "bearerAuth"
"""The security scheme's name: ``Authorization: Bearer ifk_...`` (an API key)."""


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Every refusal's body, as OpenAI sends it (``errors.IdlefleetError.to_openai``)."""

    error: OpenAIErrorDetail


class FileObject(BaseModel):
    """OpenAI's File object (``shapes.file_json``)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    expires_at: int | None


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    """OpenAI's Batch object with our ``purpose`` and ``data_region`` (``shapes.batch_json``)."""

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None
    purpose: Purpose
    data_region: DataRegion


class EnrolmentObject(BaseModel):
    """A car's enrolment (``shapes.enrolment_json``)."""

    object: Literal["fleet.enrolment"]
    vehicle_id: str
    nkey: str
    owner: str
    enrolled_at: float
    revoked_at: float | None
    expires_at: float | None
    status: Literal["enrolled", "revoked"]


ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": OpenAIError,
        "description": "Refused: a bad request (400), no or a wrong key (401), a role that may "
        "not (403), not found or not yours (404), a conflicting state (409), too large (413) "
        "or over the key's quota (429).",
    }
}
"""The refusals any route with a key may answer."""

ONLINE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    503: {"model": OpenAIError, "description": "No vehicle can take the request now; retry."},
}


def _link(operation: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation, "parameters": parameters}


UPLOADED_FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "model": FileObject,
        "description": "The uploaded file",
        "links": {
            "GetFile": _link("get_file", file_id="$response.body#/id"),
            "GetFileContent": _link("get_file_content", file_id="$response.body#/id"),
            "CreateBatch": {
                "operationId": "create_batch",
                "requestBody": {"input_file_id": "$response.body#/id"},
            },
        },
    }
}
FILE: dict[int | str, dict[str, Any]] = {200: {"model": FileObject, "description": "The file"}}
FILE_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
    },
    # Refusals are JSON, not the route's octet-stream (stated whole: FastAPI would give a
    # model's schema the route's media type).
    "4XX": {
        "description": ERRORS["4XX"]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
    },
}
STATEMENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The statement's rows: JSON, or CSV with ``format=csv``",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    },
}
_BATCH_LINKS = {
    "GetBatch": _link("get_batch", batch_id="$response.body#/id"),
    "CancelBatch": _link("cancel_batch", batch_id="$response.body#/id"),
    "GetInputFile": _link("get_file", file_id="$response.body#/input_file_id"),
    "BatchVehicles": _link("batch_vehicles", batch_id="$response.body#/id"),
}
CREATED_BATCH: dict[int | str, dict[str, Any]] = {
    200: {"model": BatchObject, "description": "The batch", "links": _BATCH_LINKS}
}
BATCH: dict[int | str, dict[str, Any]] = {
    200: {"model": BatchObject, "description": "The batch", "links": _BATCH_LINKS}
}
ENROLMENT: dict[int | str, dict[str, Any]] = {
    201: {
        "model": EnrolmentObject,
        "description": "The car is enrolled",
        "links": {
            "GetPolicy": _link("get_policy", vehicle_id="$response.body#/vehicle_id"),
            "SetPolicy": _link("set_policy", vehicle_id="$response.body#/vehicle_id"),
            "SetConsent": _link("set_consent", vehicle_id="$response.body#/vehicle_id"),
            "ConsentRecord": _link("consent_record", vehicle_id="$response.body#/vehicle_id"),
            "Revoke": _link("revoke", vehicle_id="$response.body#/vehicle_id"),
        },
    }
}

_TEXT = {"type": "string"}


def _models(kind: str) -> dict[str, Any]:
    """A workload's model names: the catalogue's ids and aliases (another is 404)."""
    names = [name for m in MODELS.values() if m.kind == kind for name in (m.id, *m.aliases)]
    return {"type": "string", "enum": names}


_EMBEDDINGS_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": False,
    "properties": {
        "model": _models("embeddings"),
        "input": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": 2048,
                },
            ]
        },
        "encoding_format": {"enum": ["float", "base64", None]},
        "dimensions": {"anyOf": [{"const": 384}, {"type": "null"}]},
        "user": {"type": ["string", "null"]},
    },
}
_STOP = {"type": "string", "minLength": 1, "maxLength": 200}
_CHAT_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": False,
    "properties": {
        "model": _models("chat"),
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "additionalProperties": False,
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant"]},
                    "content": {
                        "anyOf": [
                            _TEXT,
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "text"],
                                    "properties": {"type": {"const": "text"}, "text": _TEXT},
                                },
                            },
                        ]
                    },
                    "name": {"type": ["string", "null"]},
                },
            },
        },
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": ["integer", "null"]},
        "stop": {
            "anyOf": [
                _STOP,
                {"type": "array", "items": _STOP, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {"include_usage": {"type": ["boolean", "null"]}},
        },
        "n": {"enum": [1, None]},
        "user": {"type": ["string", "null"]},
        "frequency_penalty": {"enum": [0, None]},
        "presence_penalty": {"enum": [0, None]},
        "logprobs": {"enum": [False, None]},
    },
}
_ONLINE_BODIES = {"embeddings": _EMBEDDINGS_BODY, "chat": _CHAT_BODY}


def online_body(kind: str) -> dict[str, Any]:
    """The ``openapi_extra`` of a workload's online route: its OpenAI request body (the outline;
    the workload's ``plan`` is the full rule, e.g. a model's context window) and, for chat, the
    streamed response (``"stream": true``) beside the JSON one."""
    extra: dict[str, Any] = {}
    schema = _ONLINE_BODIES.get(kind)
    if schema is not None:
        content = {"application/json": {"schema": schema}}
        extra["requestBody"] = {"required": True, "content": content}
    if kind == "chat":
        extra["responses"] = {
            "200": {
                "description": "The completion (JSON), or its server-sent events when streamed",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    # Each event: a ``data:`` line of one chunk (``chat.completion.chunk``)
                    # or the final ``[DONE]``.
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"data": {"type": "string"}},
                        }
                    },
                },
            }
        }
    return extra


def operation_id(route: APIRoute) -> str:
    """An operation's id is its handler's name (``upload_file``, ``create_batch``): short and
    stable, what links and generated clients refer to."""
    return route.name


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the Bearer key: declared once, required by every
    operation but the open ones (health and this description)."""
    build = app.openapi  # FastAPI's own, which caches what it builds in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})[BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An idlefleet API key (ifk_...); its role decides what it may do.",
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation["security"] = [] if path in OPEN_PATHS else [{BEARER: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
