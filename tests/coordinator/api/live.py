"""The real coordinator HTTP app on a free local port, in a thread, without NATS.

The app, services and SQLite store are the production ones; only the NATS edge is left out.
Policy pushes go to a recorder instead (``LiveCoordinator.pushes``), whose answer a test can
set, so the owner API's push is observable. Shared by ``tests/coordinator/api`` and
``tests/cli`` (the CLI talks to this server over real HTTP).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from idlefleet.coordinator.access import Role, new_api_key
from idlefleet.coordinator.api import create_app
from idlefleet.coordinator.api.auth import Access
from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.store import Enrolment, open_store, sqlite_url
from idlefleet.coordinator.verification import Verifier
from idlefleet.coordinator.work import WorkService
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from idlefleet.protocol.policy import PolicyUpdate

KEYS = {
    # name -> (role, principal)
    "operator": (Role.OPERATOR, "ops"),
    "alice": (Role.OWNER, "alice"),
    "bob": (Role.OWNER, "bob"),
    "acme": (Role.CUSTOMER, "acme"),
    "globex": (Role.CUSTOMER, "globex"),
}


class LiveCoordinator:
    def __init__(self, base_url: str, batches: BatchService, work: WorkService) -> None:
        self.base_url = base_url
        self.batches = batches
        self.work = work
        self.keys: dict[str, str] = {}
        """API key secrets by name (``KEYS``): an operator, owners alice and bob, customers
        acme and globex."""
        self.key_ids: dict[str, str] = {}
        self.pushes: list[tuple[str, PolicyUpdate]] = []
        self.push_answer: bool | Exception = True
        """What the next pushes return (True: the car acknowledged), or raise."""

    async def push(self, vehicle_id: str, update: PolicyUpdate) -> bool:
        self.pushes.append((vehicle_id, update))
        if isinstance(self.push_answer, Exception):
            raise self.push_answer
        return self.push_answer

    def enrol(self, vehicle_id: str, owner: str = "alice") -> str:
        """Enrol ``vehicle_id`` under ``owner`` with a fresh nkey; returns its seed."""
        seed = new_nkey_seed()
        self.work.store.enrol(Enrolment(vehicle_id, public_nkey(seed), owner, time.time()))
        return seed

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        key: str | None = "alice",
    ) -> tuple[int, Any]:
        """One HTTP request as the key named ``key`` (None: no key); (status, decoded JSON
        body), also for error statuses."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@contextmanager
def live_coordinator(directory: Path, **app_options: Any) -> Iterator[LiveCoordinator]:
    """The production app on a real socket; ``app_options`` go to ``create_app`` (its
    ``metrics``, ``overview``: build them from ``(store, work)`` with a callable)."""
    store = open_store(sqlite_url(directory / "coordinator.db"))
    batches = BatchService(store)
    work = WorkService(store, batches)
    work.verifier = Verifier(store)  # as the server has one
    batches.finalize_gate = work.verifier.may_finalize
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    live = LiveCoordinator(f"http://127.0.0.1:{port}", batches, work)
    for name, (role, principal) in KEYS.items():
        secret, record = new_api_key(role, principal, name)
        store.put_api_key(record)
        live.keys[name] = secret
        live.key_ids[name] = record.id

    async def validate(batch_id: str) -> None:
        batches.validate(batch_id)

    built = {k: v(store, work) if callable(v) else v for k, v in app_options.items()}
    app = create_app(batches, work, Access(store), None, validate, live.push, **built)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # uvicorn offers no event; its flag flips once it listens
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the coordinator app did not start")
        time.sleep(0.01)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        store.close()
