"""Bad input from cars over the real wire: refused, counted, and nothing else slowed or lost.

A real nats-server and coordinator process with two agents running a batch. Meanwhile one
registered car floods heartbeats, another sends garbage on every uplink verb, a third uses an
id that never registered, and 40 well-behaved cars heartbeat. The well-behaved cars must all be
answered (no refusals, no timeouts), every bad message refused with its reason, the refusals
counted in ``/fleet/dispatch``, and the batch completed with every request once.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import nats
import pytest

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.protocol import subjects
from idlefleet.protocol.messages import Hardware, Heartbeat, RegisterRequest
from idlefleet.protocol.subjects import Uplink
from tests.integration.conftest import car_request, read_jsonl, submit, wait_for

N = 400
GOOD = 40


async def _register(nc: nats.NATS, vehicle_id: str) -> None:
    request = RegisterRequest(
        protocol_version=1,
        agent_version="test",
        hardware=Hardware(accelerator="HW4", tops=100, memory_gb=16, power_w=100),
        models=["all-MiniLM-L6-v2"],
    )
    reply = await car_request(
        nc, subjects.uplink(vehicle_id, Uplink.REGISTER), request.model_dump_json().encode(), 10
    )
    assert json.loads(reply.data)["accepted"]


def _code(data: bytes) -> str | None:
    error = json.loads(data).get("error")
    return None if error is None else str(error["code"])


@pytest.mark.integration
def test_flood_garbage_and_strangers_are_refused_and_nothing_else_suffers(
    tmp_path: Path,
) -> None:
    options = FleetOptions(data_dir=tmp_path, agents=2, heartbeat_seconds=1.0, lease_seconds=10)
    with EmbeddedFleet(options) as fleet:
        from openai import OpenAI

        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        batch = submit(client, batch_input(demo_texts(N)))

        async def scenario() -> tuple[Counter[str | None], Counter[str | None], list[str]]:
            nc = await nats.connect(
                fleet.nats_url, pending_size=64 * 1024 * 1024, **fleet.nats_credentials
            )
            try:
                for vid in ("flooder", "garbler", *(f"good-{i}" for i in range(GOOD))):
                    await _register(nc, vid)
                beat = Heartbeat(seq=1, status="idle").model_dump_json().encode()
                flood_codes: Counter[str | None] = Counter()
                bad_codes: Counter[str | None] = Counter()
                good_problems: list[str] = []

                async def flood() -> None:
                    subject = subjects.uplink("flooder", Uplink.HEARTBEAT)
                    replies = await asyncio.gather(
                        *(car_request(nc, subject, beat, 10) for _ in range(1500)),
                        return_exceptions=True,
                    )
                    for reply in replies:
                        flood_codes[
                            "timeout" if isinstance(reply, Exception) else _code(reply.data)
                        ] += 1

                async def garbage() -> None:
                    payloads = [b"\xff\xfe", b"{}", b"[1,2]", b'{"seq": -1}', b"x" * 5000]
                    for verb in Uplink:
                        for payload in payloads:
                            reply = await car_request(
                                nc, subjects.uplink("garbler", verb), payload, 10
                            )
                            bad_codes[_code(reply.data)] += 1
                    for verb in (Uplink.HEARTBEAT, Uplink.WORK):
                        message = (
                            beat
                            if verb is Uplink.HEARTBEAT
                            else b'{"max_requests": 1, "models": ["all-MiniLM-L6-v2"]}'
                        )
                        reply = await car_request(
                            nc, subjects.uplink("stranger", verb), message, 10
                        )
                        bad_codes[_code(reply.data)] += 1

                async def good_car(vehicle_id: str) -> None:
                    subject = subjects.uplink(vehicle_id, Uplink.HEARTBEAT)
                    for _ in range(10):
                        try:
                            reply = await car_request(nc, subject, beat, 5)
                        except Exception as exc:
                            good_problems.append(f"{vehicle_id}: {exc!r}")
                            return
                        if _code(reply.data) is not None:
                            good_problems.append(f"{vehicle_id}: {reply.data!r}")
                        await asyncio.sleep(0.1)

                await asyncio.gather(
                    flood(), garbage(), *(good_car(f"good-{i}") for i in range(GOOD))
                )
                return flood_codes, bad_codes, good_problems
            finally:
                await nc.close()

        flood_codes, bad_codes, good_problems = asyncio.run(scenario())
        finished = wait_for(client, batch.id, timeout=240)
        rows = read_jsonl(client, finished.output_file_id or "")
        dispatch = fleet.get("/fleet/dispatch")

    assert good_problems == []
    assert flood_codes["timeout"] == 0
    assert flood_codes["rate_limited"] >= 1000  # a burst of 200, then 50/s
    assert set(flood_codes) <= {None, "rate_limited"}
    # Every verb refuses every malformed payload (``{}`` is a complete policy request, the one
    # valid message among them); the stranger is told to register.
    assert bad_codes["bad_message"] == len(Uplink) * 5 - 1
    assert bad_codes[None] == 1
    assert bad_codes["not_registered"] == 2
    assert dispatch["refused"]["rate_limited"] == flood_codes["rate_limited"]
    assert dispatch["refused"]["bad_message"] == len(Uplink) * 5 - 1
    assert finished.status == "completed"
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(N))
