"""FastAPI application: OpenAI-compatible ``/v1`` routes, the fleet API and health.

Errors leave as OpenAI error bodies (``{"error": {message, type, param, code}}``) with the
status of the :class:`~idlefleet.coordinator.errors.IdlefleetError` raised; request bodies that
fail schema validation get a 400 in the same shape, never a 422 or a 500.

The owner API (``/fleet/vehicles/{id}/policy`` and ``/consent``) appends policy versions and
then pushes the new version to the car at once (best effort: an offline car catches up through
its heartbeat), because an opt-out must not wait for the car to poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.resources
import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal, Protocol, TypeVar

import orjson
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from idlefleet.coordinator import statements
from idlefleet.coordinator.access import Caller, Role
from idlefleet.coordinator.accounts import Customer
from idlefleet.coordinator.api import openapi_doc
from idlefleet.coordinator.api.auth import OPEN_PATHS, Access, RequireBearer
from idlefleet.coordinator.api.openapi_doc import METADATA, VehicleId, choices
from idlefleet.coordinator.api.shapes import (
    batch_json,
    consent_json,
    enrolment_json,
    file_json,
    lease_json,
    model_json,
    page,
    policy_json,
    vehicle_json,
)
from idlefleet.coordinator.batch_input import SUPPORTED_ENDPOINTS
from idlefleet.coordinator.batches import COMPLETION_WINDOWS, BatchService
from idlefleet.coordinator.errors import (
    Conflict,
    Forbidden,
    IdlefleetError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from idlefleet.coordinator.ledger import Entry
from idlefleet.coordinator.metrics import CONTENT_TYPE, Metrics, route_of
from idlefleet.coordinator.online import Watch
from idlefleet.coordinator.overview import Overview
from idlefleet.coordinator.owners import PolicyVersion, check_vehicle_id, invalid_from
from idlefleet.coordinator.store import Enrolment, VehicleRecord
from idlefleet.coordinator.text_check import (
    may_hold_surrogates,
    surrogate_message,
    unpaired_surrogate,
)
from idlefleet.coordinator.work import WorkService
from idlefleet.models.catalog import MODELS, resolve_model
from idlefleet.protocol.policy import (
    DATA_REGIONS,
    DEFAULT_DATA_REGION,
    DEFAULT_PURPOSE,
    PURPOSES,
    DataRegion,
    OwnerPolicy,
    PolicyUpdate,
    Purpose,
)
from idlefleet.workloads import WORKLOADS, Workload
from idlefleet.workloads.base import OnlineStream, Planned

log = logging.getLogger(__name__)


def ledger_entry_json(e: Entry) -> dict[str, Any]:
    body = dataclasses.asdict(e)
    body["postings"] = [{"account": a, "amount": amount} for a, amount in e.postings]
    return body


class OnlineRunner(Protocol):
    async def run(
        self,
        workload: Workload,
        planned: Planned,
        watch: Watch | None = None,
        customer: Customer | None = None,
    ) -> tuple[bytes, int]:
        """Run one request on a car now: its result (checked) and its tokens; ``watch`` sees
        its progress as it runs; ``customer`` is charged for it."""
        ...


class CreateBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Every field is checked by BatchService, whose messages name the allowed values; the
    # schema only documents them (``openapi_doc.choices``).
    input_file_id: str
    endpoint: Annotated[str, Field(json_schema_extra=choices(SUPPORTED_ENDPOINTS))]
    completion_window: Annotated[str, Field(json_schema_extra=choices(COMPLETION_WINDOWS))]
    metadata: Annotated[dict[str, str] | None, Field(json_schema_extra=METADATA)] = None
    # Extensions (clients send them with the SDK's ``extra_body``).
    purpose: Annotated[str, Field(json_schema_extra=choices(PURPOSES))] = DEFAULT_PURPOSE
    data_region: Annotated[str, Field(json_schema_extra=choices(DATA_REGIONS))] = (
        DEFAULT_DATA_REGION
    )


class SetPolicyBody(BaseModel):
    """``PUT /fleet/vehicles/{id}/policy``: a whole policy. Who sets it is the caller's key
    (``owner:<name>`` or ``operator:<name>``), never what the body says."""

    model_config = ConfigDict(extra="forbid")

    policy: OwnerPolicy


class ConsentBody(BaseModel):
    """``POST /fleet/vehicles/{id}/consent``: opt in or out, optionally narrowing the scope."""

    model_config = ConfigDict(extra="forbid")

    opted_in: StrictBool  # consent is never inferred from 1, "yes" or "true"
    purposes: list[Purpose] | None = None
    data_regions: list[DataRegion] | None = None


PolicyPush = Callable[[str, PolicyUpdate], Awaitable[bool]]
_Body = TypeVar("_Body", bound=BaseModel)


async def _parse_body(request: Request, model: type[_Body]) -> _Body:
    """Parse the raw body ourselves, so a 400 names the field and the problem exactly."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_from(exc) from None


def _json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses ``model`` itself (``_parse_body``)."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema}}}


_END = object()


async def _streamed(
    online: OnlineRunner,
    workload: Workload,
    planned: Planned,
    stream: OnlineStream,
    customer: Customer | None = None,
) -> StreamingResponse:
    """A streamed online response (server-sent events, as OpenAI sends them). The request runs
    in a task that queues the events; the response starts once the first car has reported (a
    request no car can take is an HTTP error, not a stream), and an error after that is an
    ``error`` event. A client that goes away cancels the request."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    class Watch:
        def progress(self, data: bytes) -> None:
            for event in stream.progress(data):
                queue.put_nowait(event)

        def result(self, data: bytes, tokens: int) -> None:
            for event in stream.result(data, tokens):
                queue.put_nowait(event)

    async def drive() -> None:
        try:
            await online.run(workload, planned, Watch(), customer=customer)
        except IdlefleetError as exc:
            queue.put_nowait(exc)
        except Exception:
            log.exception("a streamed %s request failed", workload.kind)
            failed = "The server had an error while processing your request."
            queue.put_nowait(IdlefleetError(failed))
        queue.put_nowait(_END)

    task = asyncio.create_task(drive())
    first = await queue.get()
    if isinstance(first, IdlefleetError):
        raise first

    async def events() -> AsyncIterator[bytes]:
        try:
            for event in [*stream.start(), first]:
                if event is not _END:
                    yield _sse(event)
            item = first
            while item is not _END:
                item = await queue.get()
                if isinstance(item, IdlefleetError):
                    yield _sse(item.to_openai())
                    return
                if item is not _END:
                    yield _sse(item)
            yield b"data: [DONE]\n\n"
        finally:
            task.cancel()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _attachment(filename: str) -> str:
    """A Content-Disposition any uploaded name fits (RFC 6266): a printable-ASCII fallback and
    the exact name, percent-encoded UTF-8 (a name such as "🚗.jsonl" put as it is could not be
    a header at all: a 500)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    exact = urllib.parse.quote(filename.encode("utf-8", "replace"), safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


@functools.cache
def DASHBOARD_PAGE() -> bytes:
    """The dashboard: one page, its script and styles inline, the world's land outline
    inline (nothing loads from anywhere but this coordinator)."""
    folder = importlib.resources.files("idlefleet.coordinator") / "dashboard"
    world = (folder / "world.svg").read_text(encoding="utf-8")
    land = re.search(r"<path [^>]*/>", world)
    assert land is not None, "world.svg holds the land outline"
    page = (folder / "index.html").read_text(encoding="utf-8")
    return page.replace("__WORLD__", land.group(0)).encode()


class TimeRequests:
    """ASGI middleware: every HTTP request's latency, by the route template it matched."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            # The router filled in ``scope["route"]`` while it dispatched.
            self.metrics.http.labels(route_of(scope), scope["method"]).observe(
                time.perf_counter() - started
            )


class OctetStream(StreamingResponse):
    media_type = "application/octet-stream"


class EnrolBody(BaseModel):
    """``POST /fleet/enrolments``: enrol a car by the public nkey it will connect with."""

    model_config = ConfigDict(extra="forbid")

    vehicle_id: Annotated[str, Field(min_length=1, max_length=64)]
    nkey: Annotated[str, Field(min_length=56, max_length=56, pattern=r"^U[A-Z2-7]{55}$")]
    owner: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\x00]*$")]
    expires_at: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Unix time after which the car's credentials stop working (None: until revoked)."""


def create_app(
    batches: BatchService,
    work: WorkService,
    access: Access,
    online: OnlineRunner | None = None,
    on_batch_created: Callable[[str], Coroutine[Any, Any, None]] | None = None,
    push_policy: PolicyPush | None = None,
    dispatch_status: Callable[[], dict[str, Any]] | None = None,
    security_status: Callable[[], dict[str, Any]] | None = None,
    on_enrolment: Callable[[], Awaitable[None]] | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    metrics: Metrics | None = None,
    metrics_need_key: bool = False,
    overview: Overview | None = None,
) -> FastAPI:
    """Build the HTTP app.

    ``on_batch_created`` runs validation (and announces the new work); ``push_policy`` sends a
    changed owner policy to its car (None: no push, the car catches up by heartbeat);
    ``dispatch_status`` tells what this replica's NATS edge is doing (``/fleet/dispatch``);
    ``lifespan`` starts and stops the replica's own work around the server's. ``access``
    decides who may call what (every route but ``/healthz``, the API's own description,
    ``/openapi.json`` and ``/docs``, and ``/metrics`` unless ``metrics_need_key``, needs a
    key). ``metrics`` (None: no ``/metrics``) times every request by route; ``overview``
    (None: no dashboard) answers ``/fleet/overview``, which the page at ``/dashboard`` (open:
    it asks for a key and sends it) polls.
    """
    batches.on_foreign = lambda principal, object_id: access.log.refused(
        "not_yours", f"{principal} asked for {object_id}"
    )
    customer = Depends(access.dependency(Role.CUSTOMER))

    anyone = Depends(access.dependency(Role.CUSTOMER, Role.OWNER, Role.OPERATOR))
    owner = Depends(access.dependency(Role.OWNER, Role.OPERATOR))
    operator = Depends(access.dependency(Role.OPERATOR))
    app = FastAPI(
        title="idlefleet coordinator",
        version="0.1.0",
        description="OpenAI-compatible Files, Batches, Embeddings and Models API served by a "
        "fleet of parked vehicles, plus the fleet API.",
        lifespan=lifespan,
        responses=openapi_doc.ERRORS,
        generate_unique_id_function=openapi_doc.operation_id,
    )
    openapi_doc.install(app)
    background: set[asyncio.Task[None]] = set()
    open_paths = OPEN_PATHS | {"/dashboard"}
    if metrics is not None and not metrics_need_key:
        open_paths |= {"/metrics"}
    app.add_middleware(RequireBearer, log=access.log, open_paths=open_paths)
    if metrics is not None:
        app.add_middleware(TimeRequests, metrics=metrics)

    @app.exception_handler(IdlefleetError)
    async def _our_error(_: Request, exc: IdlefleetError) -> JSONResponse:
        return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=exc.headers)

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
    @app.post("/v1/files", tags=["files"], responses=openapi_doc.UPLOADED_FILE, response_model=None)
    async def upload_file(
        file: Annotated[UploadFile, File()],
        # Checked by BatchService (its message names the allowed value); the enum documents it.
        purpose: Annotated[str, Form(json_schema_extra={"enum": ["batch"]})],
        caller: Caller = customer,
    ) -> dict:
        if file.size is not None:
            batches.check_upload(purpose, file.size)
        data = await file.read()
        record = await asyncio.to_thread(
            batches.upload_file, file.filename or "upload.jsonl", purpose, data, caller.principal
        )
        return file_json(record)

    @app.get("/v1/files/{file_id}", tags=["files"], responses=openapi_doc.FILE, response_model=None)
    async def get_file(file_id: str, caller: Caller = customer) -> dict:
        return file_json(await asyncio.to_thread(batches.get_file, file_id, caller.principal))

    @app.get(
        "/v1/files/{file_id}/content",
        tags=["files"],
        response_class=OctetStream,
        responses=openapi_doc.FILE_CONTENT,
    )
    async def get_file_content(
        file_id: str, request: Request, caller: Caller = customer
    ) -> StreamingResponse:
        record = await asyncio.to_thread(batches.get_file, file_id, caller.principal)
        chunks = await asyncio.to_thread(batches.file_content, file_id, caller.principal)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(record.bytes),
                "Content-Disposition": _attachment(record.filename),
                **request.state.limits,
            },
        )

    # -- batches -------------------------------------------------------------------------------
    # Parsed by pydantic from the raw bytes (not FastAPI's json.loads), which refuses text that
    # is JSON but not Unicode (a lone surrogate escape in metadata was a 500 at the store).
    @app.post(
        "/v1/batches",
        tags=["batches"],
        openapi_extra=_json_body_doc(CreateBatchBody),
        responses=openapi_doc.CREATED_BATCH,
        response_model=None,
    )
    async def create_batch(request: Request, caller: Caller = customer) -> dict:
        body = await _parse_body(request, CreateBatchBody)
        batch = await asyncio.to_thread(
            batches.create_batch,
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            body.purpose,
            body.data_region,
            caller.principal,
            caller.quotas.queued_requests,
            caller.key_id,
        )
        if on_batch_created is not None:
            task = asyncio.create_task(on_batch_created(batch.id))
            background.add(task)
            task.add_done_callback(background.discard)
        return batch_json(batch)

    @app.get(
        "/v1/batches/{batch_id}", tags=["batches"], responses=openapi_doc.BATCH, response_model=None
    )
    async def get_batch(batch_id: str, caller: Caller = customer) -> dict:
        return batch_json(await asyncio.to_thread(batches.get_batch, batch_id, caller.principal))

    @app.get("/v1/batches", tags=["batches"])
    async def list_batches(
        limit: int = Query(20, json_schema_extra={"minimum": 1, "maximum": 100}),
        after: str | None = Query(None),
        caller: Caller = customer,
    ) -> dict[str, Any]:
        found, has_more = await asyncio.to_thread(
            batches.list_batches, limit, after, caller.principal
        )
        return page([batch_json(b) for b in found], has_more)

    @app.post(
        "/v1/batches/{batch_id}/cancel",
        tags=["batches"],
        responses=openapi_doc.BATCH,
        response_model=None,
    )
    async def cancel_batch(batch_id: str, caller: Caller = customer) -> dict:
        return batch_json(await asyncio.to_thread(batches.cancel, batch_id, caller.principal))

    # -- models and embeddings -----------------------------------------------------------------
    @app.get("/v1/models", tags=["models"], dependencies=[anyone])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_json(m) for m in MODELS.values()]}

    @app.get("/v1/models/{model_id:path}", tags=["models"], dependencies=[anyone])
    async def get_model(model_id: str) -> dict:
        info = resolve_model(model_id)
        if info is None:
            raise NotFound(
                f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return model_json(info)

    def online_route(workload: Workload) -> Callable[..., Awaitable[Any]]:
        async def create(request: Request, caller: Caller = customer) -> Any:
            raw = await request.body()
            try:
                # Decoded strictly first (a byte-order mark is allowed, as in batch files):
                # json.loads(bytes) lets an encoded surrogate through (b"\xed\xa0\x80"), and
                # the error response that quoted it then failed.
                body = json.loads(raw.decode("utf-8-sig"))
            except RecursionError:  # a 400 like any bad JSON, not a 500
                raise InvalidRequest(
                    "We could not parse the JSON body of your request: it is nested too deeply.",
                    code="invalid_json",
                ) from None
            except ValueError as exc:  # not UTF-8, not JSON, a number of over 4,300 digits
                raise InvalidRequest(
                    f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
                ) from None
            if may_hold_surrogates(raw) and (bad := unpaired_surrogate(body)) is not None:
                raise InvalidRequest(surrogate_message(bad), code="invalid_value", param=bad)
            planned = workload.plan(body)
            # The request was taken on arrival (a refused one costs its sender too); its
            # tokens are known once it is planned.
            limits = access.take(caller, planned.cost.tokens, requests=0)
            if online is None:
                raise ServiceUnavailable("online inference is not configured", code="no_capacity")
            stream = workload.stream_online(planned)
            charged = Customer(caller.principal, caller.key_id)
            if stream is None:
                result, tokens = await online.run(workload, planned, customer=charged)
                return JSONResponse(workload.render_online(planned, result, tokens), headers=limits)
            response = await _streamed(online, workload, planned, stream, charged)
            response.headers.update(limits)
            return response

        create.__name__ = f"create_{workload.kind}"
        return create

    # Every workload's OpenAI endpoint, online (its batches go through /v1/batches).
    for workload in WORKLOADS.values():
        app.post(
            workload.endpoint,
            tags=[workload.kind],
            response_model=None,
            responses=openapi_doc.ONLINE_ERRORS,
            openapi_extra=openapi_doc.online_body(workload.kind),
        )(online_route(workload))

    # -- fleet and health ----------------------------------------------------------------------
    @app.get("/fleet/vehicles", tags=["fleet"])
    async def list_vehicles(caller: Caller = owner) -> dict[str, Any]:
        def read() -> list[tuple[VehicleRecord, PolicyVersion]]:
            # The store is up to a flush behind this replica's memory: show the newer of both.
            vehicles = [work.latest(v) for v in work.store.list_vehicles()]
            if caller.role is Role.OWNER:
                mine = {e.vehicle_id for e in work.store.enrolments(caller.principal)}
                vehicles = [v for v in vehicles if v.id in mine]
            policies = work.owners.refresh([v.id for v in vehicles])
            return [(v, policies[v.id]) for v in vehicles]

        vehicles = await asyncio.to_thread(read)
        now = time.time()
        live_after = now - 3 * work.heartbeat_interval_s
        return {
            "object": "list",
            "data": [
                vehicle_json(v, now, live_after, policy, work.refused_results[v.id])
                for v, policy in vehicles
            ],
        }

    # -- enrolment: which key may connect as which car -----------------------------------------
    @app.post(
        "/fleet/enrolments",
        tags=["fleet"],
        status_code=201,
        openapi_extra=_json_body_doc(EnrolBody),
        responses=openapi_doc.ENROLMENT,
        response_model=None,
    )
    async def enrol(request: Request, caller: Caller = operator) -> JSONResponse:
        body = await _parse_body(request, EnrolBody)
        check_vehicle_id(body.vehicle_id)
        enrolment = Enrolment(
            body.vehicle_id, body.nkey, body.owner, time.time(), expires_at=body.expires_at
        )
        before = await asyncio.to_thread(work.store.get_enrolment, body.vehicle_id)
        try:
            await asyncio.to_thread(work.store.enrol, enrolment)
        except ValueError as exc:
            raise Conflict(str(exc), code="already_enrolled", param="vehicle_id") from None
        if before is not None and before.owner != body.owner:
            # A car that changes hands starts opted out: the last owner's consent is not the
            # new owner's. Appended to the consent record, as the operator who enrolled it.
            await asyncio.to_thread(
                work.owners.set_consent, body.vehicle_id, False, caller.actor, None, None
            )
        if on_enrolment is not None:
            await on_enrolment()
        return JSONResponse(enrolment_json(enrolment), status_code=201)

    @app.get("/fleet/enrolments", tags=["fleet"])
    async def list_enrolments(caller: Caller = owner) -> dict[str, Any]:
        scope = None if caller.role is Role.OPERATOR else caller.principal
        found = await asyncio.to_thread(work.store.enrolments, scope)
        return {"object": "list", "data": [enrolment_json(e) for e in found]}

    @app.delete("/fleet/enrolments/{vehicle_id}", tags=["fleet"])
    async def revoke(vehicle_id: VehicleId, caller: Caller = operator) -> dict[str, Any]:
        check_vehicle_id(vehicle_id)
        revoked = await asyncio.to_thread(work.store.revoke_enrolment, vehicle_id, time.time())
        found = await asyncio.to_thread(work.store.get_enrolment, vehicle_id)
        if found is None:
            raise NotFound(f"No vehicle '{vehicle_id}' is enrolled.", param="vehicle_id")
        if revoked and on_enrolment is not None:
            await on_enrolment()  # cut it off now, not at the next sync
        return enrolment_json(found)

    # -- owners: policy and consent ------------------------------------------------------------
    async def pushed(version: PolicyVersion) -> dict[str, Any]:
        body = policy_json(version)
        delivered = False
        if push_policy is not None:
            try:
                delivered = await push_policy(version.vehicle_id, version.update())
            except Exception:  # the change is stored; the heartbeat path will deliver it
                log.exception("pushing policy %d to %s failed", version.version, version.vehicle_id)
        body["pushed_to_vehicle"] = delivered
        return body

    async def owned(caller: Caller, vehicle_id: str) -> None:
        check_vehicle_id(vehicle_id)
        await asyncio.to_thread(access.vehicle, caller, vehicle_id)

    @app.get("/fleet/vehicles/{vehicle_id}/policy", tags=["owners"])
    async def get_policy(vehicle_id: VehicleId, caller: Caller = owner) -> dict[str, Any]:
        await owned(caller, vehicle_id)
        return policy_json(await asyncio.to_thread(work.owners.current, vehicle_id))

    @app.put(
        "/fleet/vehicles/{vehicle_id}/policy",
        tags=["owners"],
        openapi_extra=_json_body_doc(SetPolicyBody),
    )
    async def set_policy(
        vehicle_id: VehicleId, request: Request, caller: Caller = owner
    ) -> dict[str, Any]:
        await owned(caller, vehicle_id)
        body = await _parse_body(request, SetPolicyBody)
        version = await asyncio.to_thread(
            work.owners.set_policy, vehicle_id, body.policy, caller.actor
        )
        return await pushed(version)

    @app.post(
        "/fleet/vehicles/{vehicle_id}/consent",
        tags=["owners"],
        openapi_extra=_json_body_doc(ConsentBody),
    )
    async def set_consent(
        vehicle_id: VehicleId, request: Request, caller: Caller = owner
    ) -> dict[str, Any]:
        await owned(caller, vehicle_id)
        body = await _parse_body(request, ConsentBody)
        version = await asyncio.to_thread(
            work.owners.set_consent,
            vehicle_id,
            body.opted_in,
            caller.actor,
            body.purposes,
            body.data_regions,
        )
        return await pushed(version)

    @app.get("/fleet/vehicles/{vehicle_id}/consent", tags=["owners"])
    async def consent_record(
        vehicle_id: VehicleId,
        limit: int = Query(1000, json_schema_extra={"minimum": 1, "maximum": 1000}),
        caller: Caller = owner,
    ) -> dict[str, Any]:
        await owned(caller, vehicle_id)
        if not 1 <= limit <= 1000:
            raise InvalidRequest(
                f"Invalid 'limit': {limit}. Expected a value between 1 and 1000.",
                param="limit",
                code="invalid_value",
            )
        history = await asyncio.to_thread(work.owners.history, vehicle_id, limit)
        return {
            "object": "list",
            "vehicle_id": vehicle_id,
            "data": [consent_json(v) for v in history],
        }

    @app.get("/fleet/batches/{batch_id}/vehicles", tags=["fleet"], dependencies=[operator])
    async def batch_vehicles(batch_id: str) -> dict[str, Any]:
        await asyncio.to_thread(batches.get_batch, batch_id)
        usage = await asyncio.to_thread(work.store.vehicle_usage, batch_id)
        if not usage:  # a finished batch past its retention: its charges say who did what
            entries = await asyncio.to_thread(work.store.ledger_entries, batch_id=batch_id)
            for e in entries:
                if e.kind == "charge" and e.requests:
                    usage[e.vehicle_id] = usage.get(e.vehicle_id, 0) + e.requests
        return {"batch_id": batch_id, "completed_by_vehicle": usage}

    @app.get("/fleet/leases", tags=["fleet"], dependencies=[operator])
    async def list_leases(all: bool = Query(False)) -> dict[str, Any]:
        leases = await asyncio.to_thread(work.store.list_leases, not all)
        now = time.time()
        return {"object": "list", "data": [lease_json(lease, now) for lease in leases]}

    @app.get("/fleet/security", tags=["fleet"], dependencies=[operator])
    async def security() -> dict[str, Any]:
        """Refusals by reason: HTTP (keys, roles, quotas, other principals' objects) and, when
        this replica watches the NATS server, connections refused for bad credentials."""
        body = access.snapshot()
        if security_status is not None:
            body |= security_status()
        return body

    @app.get("/fleet/verification", tags=["fleet"])
    async def verification(caller: Caller = owner) -> dict[str, Any]:
        """Verification of cars' results: the policy, what was checked and found, the share of
        work re-run (``overhead``), and each car's state (``new``, ``trusted``,
        ``quarantined``), check rate and record. An owner sees only their own cars."""
        if work.verifier is None:
            return {"enabled": False, "cars": []}
        if caller.role is Role.OPERATOR:
            return {"enabled": True} | await asyncio.to_thread(work.verifier.status)
        enrolled = await asyncio.to_thread(work.store.enrolments, caller.principal)
        mine = [e.vehicle_id for e in enrolled if e.revoked_at is None]
        body = await asyncio.to_thread(work.verifier.status, mine)
        return {"enabled": True, "policy": body["policy"], "cars": body["cars"]}

    @app.post("/fleet/vehicles/{vehicle_id}/reinstate", tags=["fleet"], dependencies=[operator])
    async def reinstate(vehicle_id: str) -> dict[str, Any]:
        """Let a quarantined car work again, as a new car (every result it returns is checked
        until it has earned trust again)."""
        check_vehicle_id(vehicle_id)
        if work.verifier is None or not work.verifier.trust(vehicle_id).quarantined:
            raise NotFound(
                f"Vehicle '{vehicle_id}' is not quarantined.",
                param="vehicle_id",
                code="vehicle_not_quarantined",
            )
        record = await asyncio.to_thread(work.verifier.reinstate, vehicle_id)
        return {"vehicle_id": record.vehicle_id, "state": "new", "streak": record.streak}

    # -- money ---------------------------------------------------------------------------------
    def currency() -> str:
        return batches.accounts.prices.currency if batches.accounts is not None else "USD"

    def statement(rows: list[dict[str, Any]], fmt: str, name: str) -> Any:
        if fmt == "csv":
            return Response(
                statements.to_csv(rows),
                media_type="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
            )
        return {"object": "list", "currency": currency(), "data": rows}

    @app.get(
        "/fleet/earnings", tags=["owners"], response_model=None, responses=openapi_doc.STATEMENT
    )
    async def earnings(
        vehicle_id: str | None = None,
        owner_name: Annotated[str | None, Query(alias="owner", max_length=256)] = None,
        fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
        caller: Caller = owner,
    ) -> Any:
        """An owner's statement: per day and car, requests, compute hours, kWh, what was
        earned (``payable``: verified; ``escrow``: waiting for verification; ``reversed``: not
        paid, the car was caught), the electricity it cost at the car's tariff, and ``net``.
        Money in micro-units (CSV: in units). An owner sees their cars; an operator any."""
        if vehicle_id is not None:
            check_vehicle_id(vehicle_id)
        who = caller.principal if caller.role is Role.OWNER else owner_name

        def read() -> list[dict[str, Any]]:
            if vehicle_id is not None and caller.role is Role.OWNER:
                enrolment = work.store.get_enrolment(vehicle_id)
                if enrolment is None or enrolment.owner != caller.principal:
                    raise NotFound(
                        f"No vehicle '{vehicle_id}' of yours.",
                        param="vehicle_id",
                        code="vehicle_not_found",
                    )
            entries = work.store.ledger_entries(owner=who, vehicle_id=vehicle_id)
            power = {}
            for car in {e.vehicle_id for e in entries}:
                record = work.store.get_vehicle(car)
                power[car] = float(record.hardware.get("power_w") or 0.0) if record else 0.0
            return statements.earnings(entries, power, currency())

        return statement(await asyncio.to_thread(read), fmt, "earnings")

    @app.get("/fleet/usage", tags=["fleet"], response_model=None, responses=openapi_doc.STATEMENT)
    async def usage(
        principal: Annotated[str | None, Query(max_length=256)] = None,
        api_key_id: Annotated[str | None, Query(max_length=256)] = None,
        fmt: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
        caller: Caller = anyone,
    ) -> Any:
        """What a customer was charged: per day, model and API key (``api_key_id``: one key's
        only), requests, input and output tokens, ``charged``, ``refunded`` (results of a car
        caught cheating) and ``cost``, in micro-units (CSV: units). A customer sees their own
        keys'; an operator anyone's (or all)."""
        if caller.role is Role.OWNER:
            raise Forbidden("Owners' keys see earnings (/fleet/earnings), not usage.")
        who = caller.principal if caller.role is Role.CUSTOMER else principal
        entries = await asyncio.to_thread(
            lambda: work.store.ledger_entries(principal=who, api_key_id=api_key_id)
        )
        return statement(statements.usage(entries, currency()), fmt, "usage")

    @app.get("/fleet/ledger", tags=["fleet"], dependencies=[operator])
    async def ledger(
        batch_id: Annotated[str | None, Query(max_length=256)] = None,
        vehicle_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        """Ledger entries (a batch's, a car's, or the latest) with their postings, and every
        account's balance: the balances always sum to zero."""
        if vehicle_id is not None:
            check_vehicle_id(vehicle_id)

        def read() -> dict[str, Any]:
            entries = work.store.ledger_entries(
                batch_id=batch_id, vehicle_id=vehicle_id, limit=limit
            )
            balances = work.store.balances()
            return {
                "object": "list",
                "currency": currency(),
                "data": [ledger_entry_json(e) for e in entries],
                "balances": balances,
                "total": sum(balances.values()),
            }

        return await asyncio.to_thread(read)

    @app.get("/fleet/dispatch", tags=["fleet"], dependencies=[operator])
    async def dispatch() -> dict[str, Any]:
        """This replica's NATS edge: messages received and refused (by reason), work requests
        parked, dispatch rounds, result batches, cars known."""
        return dispatch_status() if dispatch_status is not None else {}

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if overview is not None:

        @app.get("/fleet/overview", tags=["fleet"])
        async def fleet_overview(caller: Caller = owner) -> dict[str, Any]:
            """Everything the dashboard shows, in one answer: an operator's whole fleet (cars
            by state, hardware class, verification and place; batches with progress;
            throughput; owners' earnings), or an owner's own cars and earnings."""
            if caller.role is Role.OPERATOR:
                return await asyncio.to_thread(overview.operator)
            return await asyncio.to_thread(overview.owner, caller.principal)

        @app.get("/dashboard", include_in_schema=False)
        async def dashboard() -> Response:
            """The dashboard page (no key: the page asks for one and sends it)."""
            return Response(
                DASHBOARD_PAGE(),
                media_type="text/html; charset=utf-8",
                headers={
                    "Cache-Control": "no-cache",
                    "Content-Security-Policy": "default-src 'self'; "
                    "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src 'self' data:",
                },
            )

    if metrics is not None:
        need = [operator] if metrics_need_key else []

        @app.get("/metrics", include_in_schema=False, dependencies=need)
        async def prometheus() -> Response:
            """Prometheus exposition of this replica's counters and the fleet's gauges."""
            body = await asyncio.to_thread(metrics.exposition)
            return Response(body, media_type=CONTENT_TYPE)

    return app
