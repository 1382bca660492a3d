"""1,000 idle cars long-polling while a batch runs and other cars heartbeat: all answered.

The real stack (nats-server, a coordinator process on SQLite, two agents running MiniLM) plus a
crowd of lightweight simulated cars on one NATS connection: 1,000 opted in for ``research``
work only, which long-poll for work the whole time (the batch is ``general``, so none may take
it), and 200 more that heartbeat twice a second. Before issue #9 every idle long poll held one
of 64 handler slots and the heartbeats timed out.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.protocol import subjects
from idlefleet.protocol.messages import Hardware, Heartbeat, RegisterRequest, WorkRequest
from idlefleet.protocol.subjects import Uplink
from tests.integration.conftest import car_request, read_jsonl, submit, wait_for

IDLE = 1_000
BEATING = 200
BATCH = 600


@dataclass
class Crowd:
    polls_answered: int = 0
    polls_granted: int = 0
    beats_ok: int = 0
    failures: list[str] = field(default_factory=list)
    most_parked: int = 0


async def _register(nc: nats.NATS, vehicle_id: str) -> None:
    request = RegisterRequest(
        protocol_version=1,
        agent_version="crowd",
        hardware=Hardware(accelerator="HW4", tops=100, memory_gb=16, power_w=100),
        models=["all-MiniLM-L6-v2"],
    )
    reply = await car_request(
        nc, subjects.uplink(vehicle_id, Uplink.REGISTER), request.model_dump_json().encode(), 30
    )
    assert json.loads(reply.data)["accepted"], reply.data


async def _run_crowd(fleet: EmbeddedFleet, stop: asyncio.Event, crowd: Crowd) -> None:
    nc = await nats.connect(fleet.nats_url, **fleet.nats_credentials)
    try:
        idle = [f"idle-{i:04d}" for i in range(IDLE)]
        beating = [f"beat-{i:03d}" for i in range(BEATING)]
        for group in (idle, beating):
            await asyncio.gather(*(_register(nc, vid) for vid in group))
        poll = WorkRequest(max_requests=8, models=["all-MiniLM-L6-v2"], wait_s=5)
        poll_bytes = poll.model_dump_json().encode()
        beat = Heartbeat(seq=1, status="idle").model_dump_json().encode()

        async def idle_car(vehicle_id: str) -> None:
            while not stop.is_set():
                try:
                    subject = subjects.uplink(vehicle_id, Uplink.WORK)
                    reply = await car_request(nc, subject, poll_bytes, 15)
                except Exception as exc:
                    crowd.failures.append(f"{vehicle_id} poll: {exc!r}")
                    return
                grant = json.loads(reply.data)
                crowd.polls_answered += 1
                if grant.get("lease_id") or grant.get("error"):
                    crowd.polls_granted += bool(grant.get("lease_id"))
                    crowd.failures.append(f"{vehicle_id} poll answered {grant}")
                    return

        async def beating_car(vehicle_id: str) -> None:
            while not stop.is_set():
                try:
                    reply = await car_request(
                        nc, subjects.uplink(vehicle_id, Uplink.HEARTBEAT), beat, 5
                    )
                except Exception as exc:
                    crowd.failures.append(f"{vehicle_id} heartbeat: {exc!r}")
                    return
                if json.loads(reply.data).get("ok") is not True:
                    crowd.failures.append(f"{vehicle_id} heartbeat refused: {reply.data!r}")
                    return
                crowd.beats_ok += 1
                await asyncio.sleep(0.5)

        await asyncio.gather(*(idle_car(v) for v in idle), *(beating_car(v) for v in beating))
    finally:
        await nc.close()


@pytest.mark.integration
def test_a_thousand_idle_cars_cost_nothing_while_a_batch_runs(tmp_path: Path) -> None:
    options = FleetOptions(data_dir=tmp_path, agents=2, heartbeat_seconds=1.0, lease_seconds=10)
    with EmbeddedFleet(options) as fleet:
        for i in range(IDLE):  # their owners allow research only; the batch is general work
            fleet.set_consent(f"idle-{i:04d}", True, key="operator", purposes=["research"])
        for i in range(BEATING):
            fleet.set_consent(f"beat-{i:03d}", True, key="operator")
        crowd = Crowd()

        async def scenario() -> str:
            stop = asyncio.Event()
            crowd_task = asyncio.create_task(_run_crowd(fleet, stop, crowd))
            deadline = time.monotonic() + 60
            while (parked := _parked(fleet)) < IDLE and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            crowd.most_parked = parked
            batch = await asyncio.to_thread(_submit, fleet)
            done = await asyncio.to_thread(wait_for, _client(fleet), batch, 240)
            await asyncio.sleep(6)  # at least one more full long poll of every idle car
            stop.set()
            await asyncio.wait_for(crowd_task, 30)
            assert done.status == "completed", done
            return batch

        batch_id = asyncio.run(scenario())

        client = _client(fleet)
        finished = client.batches.retrieve(batch_id)
        rows = read_jsonl(client, finished.output_file_id or "")
        dispatch = fleet.get("/fleet/dispatch")

    assert crowd.failures == []
    assert crowd.most_parked >= IDLE
    assert crowd.polls_granted == 0 and crowd.polls_answered >= IDLE
    assert crowd.beats_ok >= BEATING * 4
    assert sorted(row["custom_id"] for row in rows) == sorted(f"req-{i}" for i in range(BATCH))
    assert finished.request_counts is not None and finished.request_counts.completed == BATCH
    assert dispatch["refused"].get("overloaded", 0) == 0


def _parked(fleet: EmbeddedFleet) -> int:
    status = fleet.get("/fleet/dispatch")
    return int(status["parked_work_requests"]) if status else 0


def _client(fleet: EmbeddedFleet):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)


def _submit(fleet: EmbeddedFleet) -> str:
    return submit(_client(fleet), batch_input(demo_texts(BATCH))).id
