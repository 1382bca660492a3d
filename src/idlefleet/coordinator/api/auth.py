"""The HTTP edge of `idlefleet.coordinator.access`: who is calling, may they, and at what rate.

`Access` bundles the key ring, the quota buckets and the refusal log; `Access.dependency`
builds the FastAPI dependency a route declares (``caller: Caller = Depends(...)``), which
authenticates, checks the role and takes one request from the key's quota, putting the
``x-ratelimit-*`` headers on the response. `Access.vehicle` is the owner check: an owner may
touch only cars enrolled under their name; anything else is "not found", as for another
customer's batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response

from idlefleet.coordinator.access import (
    KEY_SHAPE,
    AccessLog,
    Caller,
    KeyRing,
    QuotaBuckets,
    Role,
)
from idlefleet.coordinator.errors import Forbidden, NotFound, RateLimited
from idlefleet.coordinator.store import Store


class Access:
    def __init__(
        self,
        store: Store,
        keys: KeyRing | None = None,
        quotas: QuotaBuckets | None = None,
        log: AccessLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.log = log or (keys.log if keys is not None else AccessLog())
        self.keys = keys or KeyRing(store, self.log)
        self.quotas = quotas or QuotaBuckets()
        self.clock = clock

    def dependency(
        self, *roles: Role, rate: bool = True
    ) -> Callable[[Request, Response], Awaitable[Caller]]:
        """A FastAPI dependency admitting keys of ``roles``; with ``rate``, it also takes one
        request from the key's quota (online routes take theirs with the tokens, later)."""

        async def admit(request: Request, response: Response) -> Caller:
            caller = self.keys.authenticate(request.headers.get("authorization"))
            try:
                caller.require(*roles)
            except Forbidden:
                self.log.refused(
                    "wrong_role", f"{caller.key_id} ({caller.role}) on {request.url.path}"
                )
                raise
            request.state.limits = {}
            if rate:
                request.state.limits = self.take(caller, 0)
                # Put on the response FastAPI makes; a route returning its own response (a
                # stream) adds ``request.state.limits`` itself.
                response.headers.update(request.state.limits)
            request.state.caller = caller
            return caller

        return admit

    def take(self, caller: Caller, tokens: int, requests: int = 1) -> dict[str, str]:
        try:
            return self.quotas.take(caller, tokens, self.clock(), requests)
        except RateLimited:
            self.log.refused("rate_limited", f"{caller.key_id} over its per-minute quota")
            raise

    def not_yours(self, caller: Caller, what: str) -> None:
        """Count a reach for another principal's object (the 404 is raised by the caller)."""
        self.log.refused("not_yours", f"{caller.key_id} ({caller.principal}) asked for {what}")

    def vehicle(self, caller: Caller, vehicle_id: str) -> None:
        """Refuse (404) an owner reaching for a car that is not enrolled under their name (a
        revoked car is no longer anybody's until it is enrolled again)."""
        if caller.role is Role.OPERATOR:
            return
        enrolment = self.store.get_enrolment(vehicle_id)
        mine = enrolment is not None and enrolment.owner == caller.principal
        if not mine or enrolment is None or enrolment.revoked_at is not None:
            self.log.refused(
                "not_your_vehicle", f"{caller.key_id} ({caller.principal}) on car {vehicle_id}"
            )
            raise NotFound(
                f"No vehicle '{vehicle_id}' is enrolled under your name.",
                param="vehicle_id",
                code="vehicle_not_found",
            )

    def snapshot(self) -> dict[str, Any]:
        return {"http_refused": self.log.snapshot()}


OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Routes that answer without a key: health, and the API's own description."""


class RequireBearer:
    """ASGI middleware: a request without a well-formed ``Bearer`` key is answered 401 before
    its body is read (FastAPI parses a multipart upload, to a temporary file, before any route
    dependency runs: without this, anyone could fill the disk). Whose key it is, and what it
    may do, the route's dependency decides."""

    def __init__(self, app: Any, log: AccessLog, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.log = log
        self.open_paths = open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        scheme, _, secret = (header or b"").decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and KEY_SHAPE.fullmatch(secret.strip()):
            await self.app(scope, receive, send)
            return
        if header is None:
            reason, code = "missing_key", "missing_api_key"
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        elif scheme.lower() != "bearer" or not secret.strip():
            reason, code = "malformed_key", "invalid_api_key"
            message = "The Authorization header must be 'Bearer <your API key>'."
        else:
            reason, code = "wrong_key", "invalid_api_key"
            message = "Incorrect API key provided: it is not an idlefleet key (ifk_...)."
        self.log.refused(reason, f"{scope['method']} {scope['path']}")
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
