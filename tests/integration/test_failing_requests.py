"""A request that fails on every car ends in the error file; the rest of its batch completes.

A real nats-server and coordinator process, and one car over the real wire that runs every
request but one, which it reports failed (``failed_seqs``) each time it gets it, as a car whose
model cannot run that input would. The request must come back at most ``max_attempts`` times,
then end failed with ``request_failed``; nothing loops.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from pathlib import Path

import nats
import numpy as np
import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.store.base import Store
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.protocol import subjects
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    ResultChunk,
    WorkRequest,
)
from idlefleet.protocol.subjects import Uplink
from tests.integration.conftest import car_request, read_jsonl, submit, wait_for

MODEL = "all-MiniLM-L6-v2"
POISON = "this input breaks every car"


def _vectors(n: int) -> str:
    v = np.zeros((n, 384), dtype="<f4")
    v[:, 0] = 1.0
    return base64.b64encode(v.tobytes()).decode()


@pytest.mark.integration
def test_a_request_that_fails_on_every_attempt_ends_in_the_error_file(tmp_path: Path) -> None:
    with EmbeddedFleet(FleetOptions(data_dir=tmp_path, agents=0, lease_seconds=10)) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        car = "car-poisoned"

        async def run_car(batch_id: str) -> Counter[str]:
            nc = await nats.connect(fleet.nats_url, **fleet.nats_credentials)
            try:
                hello = RegisterRequest(
                    protocol_version=1,
                    agent_version="test",
                    hardware=Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=1),
                    models=[MODEL],
                )
                reply = await car_request(
                    nc, subjects.uplink(car, Uplink.REGISTER), hello.model_dump_json().encode(), 10
                )
                assert json.loads(reply.data)["accepted"]
                await asyncio.to_thread(fleet.enrol, car)  # the owner API needs its owner
                await asyncio.to_thread(fleet.set_consent, car, True)
                ask = WorkRequest(max_requests=8, models=[MODEL], wait_s=1).model_dump_json()
                leased: Counter[str] = Counter()
                for _ in range(50):
                    status = (await asyncio.to_thread(client.batches.retrieve, batch_id)).status
                    if status != "in_progress" and status != "validating":
                        break
                    grant = json.loads(
                        (
                            await car_request(
                                nc, subjects.uplink(car, Uplink.WORK), ask.encode(), 10
                            )
                        ).data
                    )
                    if not grant.get("lease_id"):
                        continue
                    good = [i for i in grant["items"] if i["payload"] != [POISON]]
                    bad = [i["seq"] for i in grant["items"] if i["payload"] == [POISON]]
                    leased.update(
                        "poison" if i["payload"] == [POISON] else "good" for i in grant["items"]
                    )
                    chunk = ResultChunk(
                        lease_id=grant["lease_id"],
                        seqs=[i["seq"] for i in good],
                        token_counts=[3] * len(good),
                        sizes=[4 * 384] * len(good),
                        data_b64=_vectors(len(good)),
                        failed_seqs=bad,
                    )
                    ack = json.loads(
                        (
                            await car_request(
                                nc,
                                subjects.uplink(car, Uplink.RESULTS),
                                chunk.model_dump_json().encode(),
                                10,
                            )
                        ).data
                    )
                    assert ack.get("error") is None, ack
                return leased
            finally:
                await nc.close()

        batch = submit(client, batch_input(["first fine input", POISON, "second fine input"]))
        leased = asyncio.run(run_car(batch.id))
        done = wait_for(client, batch.id, timeout=60)
        assert done.error_file_id is not None and done.output_file_id is not None
        errors = read_jsonl(client, done.error_file_id)
        outputs = read_jsonl(client, done.output_file_id)

    assert leased["poison"] == Store.max_attempts  # then it was never handed out again
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert len(outputs) == 2
    (row,) = errors
    assert row["response"]["status_code"] == 500
    assert row["response"]["body"]["error"]["code"] == "request_failed"
