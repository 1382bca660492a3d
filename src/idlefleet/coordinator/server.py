"""Runs one coordinator replica: store, NATS edge, HTTP API and the housekeeping loops.

Any number of replicas may run on one store (PostgreSQL; SQLite for replicas on one machine)
and one NATS cluster: they share the uplink subjects in one queue group, tell each other about
new work over NATS, and take their singleton duties under claims in the store (see
:mod:`idlefleet.coordinator.batches`), so any replica answers any request and none of them is
special. Housekeeping, every replica, on its own clock:

* flush liveness (heartbeats kept in memory) to the store, one transaction a second;
* count the live fleet (all replicas' cars) from the store: the count sizes units;
* catch up with policy versions other replicas appended (heartbeat acks carry the version);
* sweep: expire leases and batches, finish batches whose work is over, take over duties
  whose claim ran out (this is also the recovery after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import uvicorn

from idlefleet.coordinator.accounts import Accounts
from idlefleet.coordinator.api import create_app
from idlefleet.coordinator.api.auth import Access
from idlefleet.coordinator.batches import BatchLimits, BatchService
from idlefleet.coordinator.ledger import Prices
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.nats_auth import AuthSync, CloudUsers
from idlefleet.coordinator.nats_log import NatsLogWatch
from idlefleet.coordinator.nats_service import CoordinatorNats, EdgeLimits
from idlefleet.coordinator.online import OnlineRouter
from idlefleet.coordinator.overview import Overview
from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.coordinator.store import open_store
from idlefleet.coordinator.trust import TrustPolicy
from idlefleet.coordinator.verification import Verifier
from idlefleet.coordinator.work import WorkService
from idlefleet.embedded.tls import client_context
from idlefleet.models.catalog import MODELS
from idlefleet.models.distribution import latest_digest, models_bucket
from idlefleet.models.manifest import ManifestError, load_public_key, trusted_keys
from idlefleet.models.release import current_release
from idlefleet.protocol.identity import public_nkey
from idlefleet.protocol.seeds import nats_servers

log = logging.getLogger(__name__)

RELEASES_REFRESH_S = 10.0
"""How often a replica reads which model releases are current (a new release reaches grants
within this)."""
VERIFICATION_REFRESH_S = 5.0
"""How often a replica learns quarantines decided by others and re-queues lost probes."""
POLICY_CATCH_UP_MARGIN_S = 10.0
"""Policy versions are re-read this far back on each catch-up: replicas' clocks differ a little
and a version committed late may carry an earlier ``created_at``."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator replica."""

    nats_url: str
    """One NATS URL or a comma-separated seed list of a cluster."""
    store_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    units: UnitPolicy = field(default_factory=UnitPolicy)
    limits: BatchLimits = field(default_factory=BatchLimits)
    edge: EdgeLimits = field(default_factory=EdgeLimits)
    heartbeat_interval_s: float = 5.0
    sweep_interval_s: float = 1.0
    flush_interval_s: float = 1.0
    replica: str = ""
    """This replica's name in claims and logs (default: host-pid)."""
    nats_seed: Path | None = None
    """The coordinators' nkey seed file (None: connect without credentials, to a server that
    asks for none)."""
    nats_auth_file: Path | None = None
    """Where to keep nats-server's accounts file up to date with the enrolments (None: another
    replica or process does it)."""
    nats_publisher: str | None = None
    """The model publisher's public nkey, the one user of the ``MODELS`` account (None: none
    may publish models)."""
    nats_pid_files: tuple[Path, ...] = ()
    """nats-server pid files to signal (SIGHUP) after rewriting ``nats_auth_file``."""
    nats_logs: tuple[Path, ...] = ()
    """nats-server log files to count refused connections and permissions in."""
    nats_ca: Path | None = None
    """CA certificate to verify the NATS servers with (None: NATS without TLS)."""
    trusted_keys: tuple[Path, ...] = ()
    """The operator's model-signing public keys: grants name the current release of each
    model they signed (none: grants name no release, cars run what they have)."""
    tls_cert: Path | None = None
    """Serve HTTPS with this certificate and ``tls_key`` (None: plain HTTP)."""
    tls_key: Path | None = None
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    """How cars' results are verified (floor, canaries, tie-breaks)."""
    prices: Prices = field(default_factory=Prices)
    """The price list, the owners' share and electricity tariffs (the ledger's)."""
    metrics_need_key: bool = False
    """``/metrics`` asks for the operator's key (default: it answers anyone, as Prometheus
    exporters do)."""
    verify_distinct_owners: bool = True
    """Results are checked only by cars of other owners (False: by any other car, for a
    fleet of one owner such as the embedded one)."""


async def run_coordinator(config: CoordinatorConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers end ``serve``)."""
    replica = config.replica or f"{socket.gethostname()}-{os.getpid()}"
    store = open_store(config.store_url)
    batches = BatchService(store, config.limits, replica=replica)
    work = WorkService(store, batches, config.units, config.heartbeat_interval_s)
    verifier = Verifier(
        store,
        config.trust,
        distinct_owners=config.verify_distinct_owners,
        digests=lambda: work.model_digests,
    )
    work.verifier = verifier
    batches.finalize_gate = verifier.may_finalize
    accounts = Accounts(
        store, config.prices, verified_through=lambda v: verifier.trust(v).verified_through
    )
    verifier.on_verified.append(accounts.verified)
    verifier.on_quarantine.append(accounts.quarantined)
    batches.accounts = accounts
    metrics = Metrics(
        fleet=lambda: store.fleet_counts(time.time() - work.live_horizon_s),
        verification=verifier.events,
    )
    work.metrics = metrics
    credentials: dict[str, Any] = {}
    if config.nats_seed is not None:
        credentials["nkeys_seed_str"] = config.nats_seed.read_text().strip()
    if config.nats_ca is not None:
        credentials["tls"] = client_context(config.nats_ca)
    nc = await nats.connect(
        servers=nats_servers(config.nats_url),
        name=f"idlefleet-coordinator-{replica}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        **credentials,
    )
    edge_limits = config.edge
    if config.nats_seed is not None:  # car identities on: answer each car in its own inbox
        edge_limits = dataclasses.replace(edge_limits, own_inbox_only=True)
    if not config.store_url.startswith("sqlite"):
        edge_limits = dataclasses.replace(edge_limits, store_threads=4)
    edge = CoordinatorNats(nc, work, edge_limits)
    await edge.start()

    loop = asyncio.get_running_loop()

    def announce_from_thread() -> None:
        # A batch's first requests are stored and leasable while the rest are (validation
        # runs on a worker thread): wake the long-polling cars now, not when it ends.
        asyncio.run_coroutine_threadsafe(edge.announce_work(), loop)

    batches.on_work = announce_from_thread

    async def validate_and_announce(batch_id: str) -> None:
        try:
            await asyncio.to_thread(batches.validate, batch_id)
        except Exception:
            log.exception("validation of %s failed; the sweeper will retry", batch_id)
            return
        await edge.announce_work()

    async def sweep() -> None:
        returned = await asyncio.to_thread(batches.sweep)
        if returned:
            metrics.expired.inc(returned)
            await edge.announce_work()

    async def catch_up_policies() -> None:
        # Versions older than the margin were seen by an earlier catch-up (or are read from
        # the store when a car first needs them); re-reading the margin costs a few rows.
        await asyncio.to_thread(work.owners.catch_up, time.time() - POLICY_CATCH_UP_MARGIN_S)

    async def flush() -> None:
        await asyncio.to_thread(work.flush_liveness)
        edge.forget_idle_budgets()

    auth_sync: AuthSync | None = None
    if config.nats_auth_file is not None:
        if config.nats_seed is None:
            raise ValueError("keeping NATS authorization needs the coordinators' nkey seed")
        cloud = CloudUsers(
            coordinator=public_nkey(config.nats_seed.read_text()),
            publisher=config.nats_publisher or "",
        )
        auth_sync = AuthSync(store, cloud, config.nats_auth_file, config.nats_pid_files)
    nkeys_to_cars: dict[str, str] = {}

    def vehicle_of(nkey: str) -> str | None:
        if nkey not in nkeys_to_cars:
            nkeys_to_cars.update({e.nkey: e.vehicle_id for e in store.enrolments()})
        return nkeys_to_cars.get(nkey)

    nats_log = NatsLogWatch(config.nats_logs, vehicle_of) if config.nats_logs else None
    sync_lock = asyncio.Lock()

    async def sync_auth() -> None:
        # Serialised: an enrolment's immediate sync and the periodic one must not interleave
        # their writes and reloads.
        if auth_sync is not None:
            async with sync_lock:
                await asyncio.to_thread(auth_sync.sync)

    async def watch_nats_log() -> None:
        if nats_log is not None:
            await asyncio.to_thread(nats_log.poll)

    trusted = trusted_keys(load_public_key(path) for path in config.trusted_keys)
    refused_releases: Counter[str] = Counter()
    refused_releases_seen: set[tuple[str, str, str | None]] = set()

    async def refresh_releases() -> None:
        # Each model's current signed release, checked as a car checks it; a model with no
        # release (or one no trusted key signed) is granted without a digest.
        if not trusted:
            return
        found: dict[str, str] = {}
        for model in MODELS:
            pointer: str | None = None
            try:
                current = await current_release(nc.jetstream(), model, trusted, time.time())
            except ManifestError as exc:  # what a car would refuse too: counted once each
                with contextlib.suppress(Exception):
                    pointer = await latest_digest(await models_bucket(nc.jetstream()), model)
                seen = (model, type(exc).__name__, pointer)
                if seen not in refused_releases_seen:
                    refused_releases_seen.add(seen)
                    refused_releases[type(exc).__name__] += 1
                    log.warning("model %s: release refused: %s", model, exc)
                continue
            except Exception as exc:
                log.warning("model %s: no usable release: %s", model, exc)
                continue
            if current is not None:
                found[model] = current[0]
        work.model_digests = found

    loops = [
        _every(RELEASES_REFRESH_S, "model releases", refresh_releases),
        _every(1.0, "NATS authorization sync", sync_auth),
        _every(1.0, "NATS log watch", watch_nats_log),
        _every(config.flush_interval_s, "liveness flush", flush),
        _every(config.heartbeat_interval_s / 2, "live count", _threaded(work.refresh_liveness)),
        _every(1.0, "policy catch-up", catch_up_policies),
        _every(config.sweep_interval_s, "sweep", sweep),
        _every(1.0, "verification flush", _threaded(verifier.flush)),
        _every(1.0, "ledger flush", _threaded(accounts.flush)),
        _every(VERIFICATION_REFRESH_S, "verification", _threaded(verifier.refresh)),
    ]

    def status() -> dict[str, object]:
        return {
            "replica": replica,
            "nats": nc.connected_url.netloc if nc.connected_url else None,
            "model_releases": dict(work.model_digests),
        }

    housekeeping: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        # Shutdown runs here, inside uvicorn's serve(): after serve() returns, uvicorn raises
        # the SIGTERM it caught again, which ends the process before any code after it.
        housekeeping.extend(asyncio.create_task(loop) for loop in loops)
        _quiet_gc()
        try:
            yield
        finally:
            for task in housekeeping:
                task.cancel()
            await edge.stop()  # parked work requests are answered: the cars ask elsewhere
            await asyncio.to_thread(work.flush_liveness)
            with contextlib.suppress(Exception):
                await nc.drain()
            store.close()
            log.info("replica %s stopped", replica)

    online = OnlineRouter(nc, work)
    online.metrics = metrics
    online.accounts = accounts
    access = Access(store)
    app = create_app(
        batches,
        work,
        access,
        online,
        validate_and_announce,
        edge.push_policy,
        dispatch_status=lambda: status() | edge.snapshot() | online.snapshot(),
        security_status=lambda: {
            **(nats_log.snapshot() if nats_log is not None else {}),
            "nats_authorization_reloads": auth_sync.reloads if auth_sync is not None else None,
            "model_releases_refused": dict(refused_releases),
            "model_releases_refused_by_cars": dict(work.releases_refused),
        },
        on_enrolment=sync_auth,
        lifespan=lifespan,
        metrics=metrics,
        metrics_need_key=config.metrics_need_key,
        overview=Overview(work, metrics, lambda: config.prices.currency),
    )
    tls: dict[str, Any] = {}
    if config.tls_cert is not None and config.tls_key is not None:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", **tls)
    )
    await server.serve()


def _quiet_gc() -> None:
    """Keep the cyclic garbage collector from stopping the replica for 60-125 ms at a time.

    With 10,000 cars known (their liveness, policies, budgets) a full collection walks every
    one of those objects, and under load one ran about every second (the dispatch bench's p99).
    Objects alive once the replica has started are frozen out of collections; young objects
    are collected less often. The refcounts free almost everything this code allocates anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _threaded(call: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return await asyncio.to_thread(call)

    return run


async def _every(interval_s: float, name: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run ``step`` every ``interval_s``; a failure (a store restarting) is logged, not fatal."""
    while True:
        try:
            await step()
        except Exception as exc:
            log.warning("%s failed: %s", name, exc)
        await asyncio.sleep(interval_s)
