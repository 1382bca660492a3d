"""FastAPI application: OpenAI-compatible ``/v1`` routes, the fleet API and health.

Errors leave as OpenAI error bodies (``{"error": {message, type, param, code}}``) with the
status of the :class:`~idlefleet.coordinator.errors.IdlefleetError` raised; request bodies that
fail schema validation get a 400 in the same shape, never a 422 or a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from idlefleet.coordinator.api.shapes import batch_json, file_json, model_json, page, vehicle_json
from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.embedding_request import validate_embedding_body
from idlefleet.coordinator.errors import IdlefleetError, InvalidRequest, NotFound
from idlefleet.coordinator.openai_format import embedding_response
from idlefleet.coordinator.work import WorkService
from idlefleet.models.catalog import MODELS, resolve_model

log = logging.getLogger(__name__)


class Embedder(Protocol):
    async def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]: ...


class CreateBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def create_app(
    batches: BatchService,
    work: WorkService,
    online: Embedder | None = None,
    on_batch_created: Callable[[str], Coroutine[Any, Any, None]] | None = None,
) -> FastAPI:
    """Build the HTTP app. ``on_batch_created`` runs validation (and announces the new work)."""
    app = FastAPI(
        title="idlefleet coordinator",
        version="0.1.0",
        description="OpenAI-compatible Files, Batches, Embeddings and Models API served by a "
        "fleet of parked vehicles, plus the fleet API.",
    )
    background: set[asyncio.Task[None]] = set()

    @app.exception_handler(IdlefleetError)
    async def _our_error(_: Request, exc: IdlefleetError) -> JSONResponse:
        return JSONResponse(exc.to_openai(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"Invalid request: {first.get('msg')}" + (f" (at '{param}')" if param else "")
        error = InvalidRequest(message, param=param, code="invalid_request")
        return JSONResponse(error.to_openai(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = IdlefleetError(str(exc.detail), code=None)
        body = error.to_openai()
        body["error"]["type"] = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(body, status_code=exc.status_code)

    # -- files ---------------------------------------------------------------------------------
    @app.post("/v1/files", tags=["files"])
    async def upload_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict:
        if file.size is not None:
            batches.check_upload(purpose, file.size)
        data = await file.read()
        record = await asyncio.to_thread(
            batches.upload_file, file.filename or "upload.jsonl", purpose, data
        )
        return file_json(record)

    @app.get("/v1/files/{file_id}", tags=["files"])
    async def get_file(file_id: str) -> dict:
        return file_json(await asyncio.to_thread(batches.get_file, file_id))

    @app.get("/v1/files/{file_id}/content", tags=["files"])
    async def get_file_content(file_id: str) -> StreamingResponse:
        record = await asyncio.to_thread(batches.get_file, file_id)
        chunks = await asyncio.to_thread(batches.file_content, file_id)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(record.bytes),
                "Content-Disposition": f'attachment; filename="{record.filename}"',
            },
        )

    # -- batches -------------------------------------------------------------------------------
    @app.post("/v1/batches", tags=["batches"])
    async def create_batch(body: CreateBatchBody) -> dict:
        batch = await asyncio.to_thread(
            batches.create_batch,
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
        )
        if on_batch_created is not None:
            task = asyncio.create_task(on_batch_created(batch.id))
            background.add(task)
            task.add_done_callback(background.discard)
        return batch_json(batch)

    @app.get("/v1/batches/{batch_id}", tags=["batches"])
    async def get_batch(batch_id: str) -> dict:
        return batch_json(await asyncio.to_thread(batches.get_batch, batch_id))

    @app.get("/v1/batches", tags=["batches"])
    async def list_batches(
        limit: int = Query(20), after: str | None = Query(None)
    ) -> dict[str, Any]:
        found, has_more = await asyncio.to_thread(batches.list_batches, limit, after)
        return page([batch_json(b) for b in found], has_more)

    @app.post("/v1/batches/{batch_id}/cancel", tags=["batches"])
    async def cancel_batch(batch_id: str) -> dict:
        return batch_json(await asyncio.to_thread(batches.cancel, batch_id))

    # -- models and embeddings -----------------------------------------------------------------
    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_json(m) for m in MODELS.values()]}

    @app.get("/v1/models/{model_id:path}", tags=["models"])
    async def get_model(model_id: str) -> dict:
        info = resolve_model(model_id)
        if info is None:
            raise NotFound(
                f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return model_json(info)

    @app.post("/v1/embeddings", tags=["embeddings"])
    async def create_embeddings(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(
                f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
            ) from None
        job = validate_embedding_body(body)
        if online is None:
            raise IdlefleetError("online inference is not configured", code="no_capacity")
        vectors, tokens = await online.embed(job.model, list(job.texts))
        return embedding_response(job.model, vectors, tokens, job.encoding_format)

    # -- fleet and health ----------------------------------------------------------------------
    @app.get("/fleet/vehicles", tags=["fleet"])
    async def list_vehicles() -> dict[str, Any]:
        vehicles = await asyncio.to_thread(work.store.list_vehicles)
        now = time.time()
        live_after = now - 3 * work.heartbeat_interval_s
        return {"object": "list", "data": [vehicle_json(v, now, live_after) for v in vehicles]}

    @app.get("/fleet/batches/{batch_id}/vehicles", tags=["fleet"])
    async def batch_vehicles(batch_id: str) -> dict[str, Any]:
        await asyncio.to_thread(batches.get_batch, batch_id)
        usage = await asyncio.to_thread(work.store.vehicle_usage, batch_id)
        return {"batch_id": batch_id, "completed_by_vehicle": usage}

    @app.get("/fleet/leases", tags=["fleet"])
    async def list_leases(all: bool = Query(False)) -> dict[str, Any]:
        leases = await asyncio.to_thread(work.store.list_leases, not all)
        now = time.time()
        return {
            "object": "list",
            "data": [
                {
                    "id": lease.id,
                    "batch_id": lease.batch_id,
                    "vehicle_id": lease.vehicle_id,
                    "model": lease.model,
                    "state": lease.state,
                    "expires_in_s": round(lease.deadline - now, 3),
                }
                for lease in leases
            ],
        }

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
