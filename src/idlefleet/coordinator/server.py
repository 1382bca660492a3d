"""Runs one coordinator replica: store, NATS edge, HTTP API and the periodic sweeper."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats
import uvicorn

from idlefleet.coordinator.api import create_app
from idlefleet.coordinator.batches import BatchLimits, BatchService
from idlefleet.coordinator.nats_service import CoordinatorNats, OnlineRouter
from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.coordinator.store import open_store
from idlefleet.coordinator.work import WorkService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of one coordinator replica."""

    nats_url: str
    store_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    units: UnitPolicy = field(default_factory=UnitPolicy)
    limits: BatchLimits = field(default_factory=BatchLimits)
    heartbeat_interval_s: float = 5.0
    sweep_interval_s: float = 1.0


async def run_coordinator(config: CoordinatorConfig) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers end ``serve``)."""
    store = open_store(config.store_url)
    batches = BatchService(store, config.limits)
    work = WorkService(store, batches, config.units, config.heartbeat_interval_s)
    await asyncio.to_thread(batches.recover)
    nc = await nats.connect(
        config.nats_url, name="idlefleet-coordinator", max_reconnect_attempts=-1
    )
    edge = CoordinatorNats(nc, work)
    await edge.start()

    async def validate_and_announce(batch_id: str) -> None:
        try:
            await asyncio.to_thread(batches.validate, batch_id)
        except Exception:
            log.exception("validation of %s failed; the sweeper will retry", batch_id)
            return
        await edge.announce_work()

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(config.sweep_interval_s)
            try:
                returned = await asyncio.to_thread(batches.sweep)
                # Validation normally starts with the request that created the batch; this
                # catches one that failed half-way and was not retried.
                stuck = await asyncio.to_thread(store.batches_with_status, ["validating"])
                for batch in stuck:
                    if batch.created_at < time.time() - 60:
                        await validate_and_announce(batch.id)
                if returned:
                    await edge.announce_work()
            except Exception:
                log.exception("sweep failed")

    app = create_app(batches, work, OnlineRouter(nc, work), validate_and_announce, edge.push_policy)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning")
    )
    sweeper = asyncio.create_task(sweep_forever())
    try:
        await server.serve()
    finally:
        sweeper.cancel()
        await nc.drain()
        store.close()
