"""The HTTP edge of `idlefleet.coordinator.access`: who is calling, may they, and at what rate.

`Access` bundles the key ring, the quota buckets and the refusal log; `Access.dependency`
builds the FastAPI dependency a route declares (``caller: Caller = Depends(...)``), which
authenticates, checks the role and takes one request from the key's quota, putting the
``x-ratelimit-*`` headers on the response. `Access.vehicle` is the owner check: an owner may
touch only cars enrolled under their name; anything else is "not found", as for another
customer's batch.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response

from idlefleet.coordinator.access import AccessLog, Caller, KeyRing, QuotaBuckets, Role
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

    def take(self, caller: Caller, tokens: int) -> dict[str, str]:
        try:
            return self.quotas.take(caller, tokens, self.clock())
        except RateLimited:
            self.log.refused("rate_limited", f"{caller.key_id} over its per-minute quota")
            raise

    def not_yours(self, caller: Caller, what: str) -> None:
        """Count a reach for another principal's object (the 404 is raised by the caller)."""
        self.log.refused("not_yours", f"{caller.key_id} ({caller.principal}) asked for {what}")

    def vehicle(self, caller: Caller, vehicle_id: str) -> None:
        """Refuse (404) an owner reaching for a car that is not enrolled under their name."""
        if caller.role is Role.OPERATOR:
            return
        enrolment = self.store.get_enrolment(vehicle_id)
        if enrolment is None or enrolment.owner != caller.principal:
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
