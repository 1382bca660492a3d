"""Verification through the real stack: a real nats-server, coordinator and two agents running
MiniLM, and a scripted car that answers every unit with random vectors. The cheater is
quarantined, what it returned is redone by the real cars, and a strict batch's output holds
only results another car agreed with."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import numpy as np
import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.protocol import subjects
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    ResultChunk,
    WorkGrant,
    WorkRequest,
    pack,
)
from idlefleet.protocol.subjects import Uplink
from tests.integration.conftest import car_request, read_jsonl, wait_for

N = 240
CHEATER = "cheater-1"


async def _cheat(fleet: EmbeddedFleet, stop: threading.Event, seen: dict[str, int]) -> None:
    """Register, then take units and answer each with random unit vectors until refused."""
    nc = await nats.connect(fleet.nats_url, **fleet.nats_credentials)
    rng = np.random.default_rng(0)
    try:
        register = RegisterRequest(
            protocol_version=1,
            agent_version="cheat",
            hardware=Hardware(accelerator="cpu", tops=1, memory_gb=4, power_w=65),
            models=["all-MiniLM-L6-v2"],
        )
        reply = await car_request(
            nc, subjects.uplink(CHEATER, Uplink.REGISTER), register.model_dump_json().encode(), 10
        )
        assert json.loads(reply.data)["accepted"]
        ask = WorkRequest(max_requests=32, models=["all-MiniLM-L6-v2"], wait_s=1.0)
        while not stop.is_set():
            msg = await car_request(
                nc, subjects.uplink(CHEATER, Uplink.WORK), ask.model_dump_json().encode(), 10
            )
            grant = WorkGrant.model_validate_json(msg.data)
            if grant.error is not None:
                seen[grant.error.code] = seen.get(grant.error.code, 0) + 1
                if grant.error.code == "quarantined":
                    return
                await asyncio.sleep(0.2)
                continue
            if grant.lease_id is None:
                continue
            rows = []
            for item in grant.items:
                v = rng.standard_normal((len(item.payload), 384))  # type: ignore[arg-type]
                rows.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype("<f4"))
            data = [r.tobytes() for r in rows]
            chunk = ResultChunk(
                lease_id=grant.lease_id,
                seqs=[i.seq for i in grant.items],
                token_counts=[5] * len(data),
                sizes=[len(d) for d in data],
                data_b64=pack(b"".join(data)),
            )
            ack = await car_request(
                nc, subjects.uplink(CHEATER, Uplink.RESULTS), chunk.model_dump_json().encode(), 10
            )
            seen["units"] = seen.get("units", 0) + 1
            seen["committed"] = seen.get("committed", 0) + json.loads(ack.data).get("committed", 0)
    finally:
        await nc.close()


@contextmanager
def cheating(fleet: EmbeddedFleet) -> Iterator[dict[str, int]]:
    """The cheater, opted in and working in a thread (its counts in the dict yielded); its
    connection is closed on the way out, whether the test passed or not."""
    fleet.set_consent(CHEATER, True, key="operator")
    stop = threading.Event()
    seen: dict[str, int] = {}
    cheater = threading.Thread(target=lambda: asyncio.run(_cheat(fleet, stop, seen)), daemon=True)
    cheater.start()
    try:
        yield seen
    finally:
        stop.set()
        cheater.join(timeout=30)


def strict_batch(client: OpenAI, lines: bytes) -> str:
    """A batch that asks that nothing unverified reach its output; its id."""
    upload = client.files.create(file=("in.jsonl", lines), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"verification": "strict"},
    ).id


@pytest.mark.integration
def test_a_cheating_car_is_quarantined_and_a_strict_batch_holds_only_agreed_results(
    tmp_path: Path,
) -> None:
    options = FleetOptions(data_dir=tmp_path, agents=2, heartbeat_seconds=1.0, lease_seconds=10)
    with EmbeddedFleet(options) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        with cheating(fleet) as seen:
            texts = demo_texts(N // 2) * 2  # each text twice: its two vectors must agree
            batch_id = strict_batch(client, batch_input(texts))
            done = wait_for(client, batch_id, timeout=240)
        assert done.status == "completed", done
        assert seen.get("units", 0) >= 1, seen  # the cheater did take work

        status = fleet.get("/fleet/verification")
        cars = {c["vehicle_id"]: c for c in status["cars"]}
        assert cars[CHEATER]["state"] == "quarantined", cars
        assert cars[CHEATER]["reason"]
        honest = [c for vid, c in cars.items() if vid != CHEATER]
        assert honest and all(c["state"] != "quarantined" for c in honest), cars
        assert status["counters"]["answered"] > 0

        # Nothing the cheater returned is in the output: every line was made by a real car
        # and agreed by another (the batch is strict), and the vectors are MiniLM's.
        usage = fleet.get(f"/fleet/batches/{batch_id}/vehicles")["completed_by_vehicle"]
        assert CHEATER not in usage and sum(usage.values()) == N, usage
        lines = read_jsonl(client, done.output_file_id or "")
        assert len(lines) == N
        vectors = {
            line["custom_id"]: np.array(line["response"]["body"]["data"][0]["embedding"])
            for line in lines
        }
        # Same text, same vector (within float noise): a random vector would not repeat.
        half = N // 2
        cosines = [
            float(np.dot(vectors[f"req-{i}"], vectors[f"req-{i + half}"])) for i in range(half)
        ]
        assert min(cosines) > 0.999, min(cosines)


@pytest.mark.integration
def test_a_cheater_that_did_all_of_a_strict_batch_before_honest_cars_came_is_caught(
    tmp_path: Path,
) -> None:
    """A new fleet: the cheater takes the whole batch before any honest car can compute. Its
    results disagree with two new honest cars; with no trusted car yet, the third car breaks
    the tie (bootstrap), the cheater is quarantined, and its work is redone."""
    options = FleetOptions(data_dir=tmp_path, agents=0, heartbeat_seconds=1.0, lease_seconds=10)
    with EmbeddedFleet(options) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        with cheating(fleet) as seen:
            batch_id = strict_batch(client, batch_input(demo_texts(N)))
            deadline = time.monotonic() + 60
            while seen.get("committed", 0) < N:  # the cheater answered every request
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
            fleet.add_agent("car-001")
            fleet.add_agent("car-002")
            done = wait_for(client, batch_id, timeout=180)

        assert done.status == "completed", done
        cars = {c["vehicle_id"]: c for c in fleet.get("/fleet/verification")["cars"]}
        assert cars[CHEATER]["state"] == "quarantined", cars
        assert all(cars[c]["state"] != "quarantined" for c in ("car-001", "car-002")), cars
        usage = fleet.get(f"/fleet/batches/{batch_id}/vehicles")["completed_by_vehicle"]
        assert CHEATER not in usage and sum(usage.values()) == N, usage
