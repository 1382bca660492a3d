"""Car identities on the real wire: nats-server with the accounts file the coordinator keeps,
one real agent, and scripted cars with their own nkeys.

Every refusal the issue lists for NATS is made here and must be refused by the server, logged,
and counted in ``/fleet/security``; the real car keeps working throughout.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.models.catalog import MINILM
from idlefleet.models.distribution import latest_digest, models_bucket
from idlefleet.protocol import subjects
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from idlefleet.protocol.messages import Hardware, RegisterRequest
from idlefleet.protocol.subjects import Downlink, Uplink
from tests.integration.conftest import submit, wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_S = 2.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("nats-security"), agents=1, heartbeat_seconds=HEARTBEAT_S
    )
    with EmbeddedFleet(options) as running:
        yield running


def eventually(check: Any, within: float, what: str, explain: Any = None) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}; {explain() if explain else ''}")
        time.sleep(0.1)


def security(fleet: EmbeddedFleet) -> dict[str, Any]:
    found = fleet.get("/fleet/security")
    assert found is not None
    return found


def refused(fleet: EmbeddedFleet, kind: str) -> int:
    return int(security(fleet).get("nats_refused", {}).get(kind, 0))


async def connect_as(fleet: EmbeddedFleet, vehicle_id: str, seed: str, **options: Any) -> Any:
    """A car's connection, for a car enrolled a moment ago: nats-server applies the reload
    that lets it in a few milliseconds after the enrolment's answer (agents retry too)."""
    for attempt in range(50):
        nc = nats.aio.client.Client()
        try:
            await nc.connect(
                fleet.nats_url,
                nkeys_seed_str=seed,
                inbox_prefix=subjects.inbox_prefix(vehicle_id),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                **options,
            )
            return nc
        except (nats.errors.Error, ConnectionError):
            await nc.close()
            if nc._transport is not None:
                nc._transport.close()
            if attempt == 49:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def refusal(fleet: EmbeddedFleet, **options: Any) -> str:
    """Why nats-server refused a connection with ``options`` ("connected" if it did not).
    The client is closed either way: nats-py leaves a refused connection's socket open."""
    nc = nats.aio.client.Client()
    try:
        await nc.connect(fleet.nats_url, allow_reconnect=False, max_reconnect_attempts=0, **options)
    except nats.errors.Error as exc:
        return str(exc)
    finally:
        await nc.close()
        if nc._transport is not None:
            nc._transport.close()
        await asyncio.sleep(0)
    return "connected"


def car_refusal(fleet: EmbeddedFleet, vehicle_id: str, seed: str) -> str:
    inbox = subjects.inbox_prefix(vehicle_id)
    return asyncio.run(refusal(fleet, nkeys_seed_str=seed, inbox_prefix=inbox))


def register_request() -> bytes:
    hardware = Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=1)
    hello = RegisterRequest(
        protocol_version=1, agent_version="t", hardware=hardware, models=["all-MiniLM-L6-v2"]
    )
    return hello.model_dump_json().encode()


def test_no_key_is_401_over_http_and_no_credentials_are_refused_by_nats(
    fleet: EmbeddedFleet,
) -> None:
    before = refused(fleet, "authentication_error")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{fleet.base_url}/v1/models", timeout=10)
    caught.value.close()
    assert caught.value.code == 401

    assert "Authorization Violation" in asyncio.run(refusal(fleet))
    eventually(lambda: refused(fleet, "authentication_error") > before, 10, "the refusal counted")


def test_a_key_that_is_not_enrolled_is_refused(fleet: EmbeddedFleet) -> None:
    before = refused(fleet, "authentication_error")
    forged = new_nkey_seed()  # a well-formed key nobody enrolled

    assert "Authorization Violation" in car_refusal(fleet, "car-001", forged)
    eventually(lambda: refused(fleet, "authentication_error") > before, 10, "the refusal counted")


def test_a_car_may_use_only_its_own_subjects_and_inbox(fleet: EmbeddedFleet) -> None:
    seed = fleet.enrol("car-nosy")
    errors: list[str] = []
    before = security(fleet)

    async def scenario() -> bytes:
        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect_as(fleet, "car-nosy", seed, error_cb=on_error)
        try:
            own = await nc.request(subjects.uplink("car-nosy", Uplink.REGISTER), register_request())
            await nc.publish(subjects.uplink("car-001", Uplink.HEARTBEAT), b"{}")
            await nc.subscribe(subjects.downlink("car-001", Downlink.RUN))
            await nc.subscribe("_INBOX.car-001.>")
            await nc.subscribe("_INBOX.>")
            await nc.flush()
            await asyncio.sleep(0.5)  # the server's -ERR lines arrive after the flush's PONG
            return bytes(own.data)
        finally:
            await nc.close()

    answer = asyncio.run(scenario())

    assert b'"accepted":true' in answer  # its own subjects work
    assert sum("publish" in e for e in errors) == 1, errors
    assert sum("subscription" in e for e in errors) == 3, errors

    def counted() -> bool:
        now = security(fleet)
        grew = now["nats_refused_by_vehicle"].get("car-nosy", 0)
        return grew >= before.get("nats_refused_by_vehicle", {}).get("car-nosy", 0) + 4

    eventually(counted, 10, "the four violations counted against car-nosy")
    # ... and the real car still works.
    with OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0) as client:
        batch = submit(client, batch_input(["still", "working"]))
        assert wait_for(client, batch.id, 60).status == "completed"


def test_revoking_a_car_cuts_it_off_within_one_heartbeat_interval(fleet: EmbeddedFleet) -> None:
    seed = fleet.enrol("car-revoked")
    cut: list[float] = []

    async def scenario() -> tuple[float, str]:
        async def on_disconnect() -> None:
            cut.append(time.monotonic())

        nc = await connect_as(fleet, "car-revoked", seed, disconnected_cb=on_disconnect)
        try:
            await nc.request(subjects.uplink("car-revoked", Uplink.REGISTER), register_request())
            revoked_at = time.monotonic()
            await asyncio.to_thread(fleet.post, "/fleet/enrolments/car-revoked", None, "DELETE")
            while not cut and time.monotonic() - revoked_at < 10:
                await asyncio.sleep(0.02)
        finally:
            await nc.close()
        inbox = subjects.inbox_prefix("car-revoked")
        return revoked_at, await refusal(fleet, nkeys_seed_str=seed, inbox_prefix=inbox)

    revoked_at, again = asyncio.run(scenario())

    assert cut, "the revoked car's connection was never closed"
    assert cut[0] - revoked_at < HEARTBEAT_S
    assert "Authorization Violation" in again
    enrolment = next(
        e for e in fleet.get("/fleet/enrolments")["data"] if e["vehicle_id"] == "car-revoked"
    )
    assert enrolment["status"] == "revoked"


def test_a_revoked_agent_goes_offline_and_a_new_key_brings_it_back(
    fleet: EmbeddedFleet, tmp_path: Path
) -> None:
    log = fleet.log_dir / "agent-car-001.log"
    refusal_line = "NATS refused this car's credentials"
    before = log.read_text().count(refusal_line)
    revoked_at = time.monotonic()
    fleet.post("/fleet/enrolments/car-001", None, "DELETE")
    eventually(
        lambda: log.read_text().count(refusal_line) > before, HEARTBEAT_S, "the agent cut off"
    )
    assert time.monotonic() - revoked_at < HEARTBEAT_S
    # The coordinator calls it offline after three missed heartbeats; a work request it had
    # parked (a long poll of up to 10 s) counts as a sighting until it ends.
    eventually(
        lambda: "car-001" not in fleet.online_vehicles(),
        3 * HEARTBEAT_S + 10 + 2,
        "car-001 offline",
        lambda: fleet.get("/fleet/vehicles"),
    )

    # The owner re-enrols the car with a new key; the old one stays refused.
    old_seed = fleet.secrets.car_seed("car-001")
    fleet.secrets.car_seed_file("car-001").unlink()
    fleet.kill_agent("car-001")
    fleet.add_agent("car-001", set_policy=False)
    eventually(lambda: "car-001" in fleet.online_vehicles(), 60, "car-001 back online")
    assert public_nkey(fleet.secrets.car_seed("car-001")) != public_nkey(old_seed)
    assert "Authorization Violation" in car_refusal(fleet, "car-001", old_seed)


def test_expired_credentials_stop_working(fleet: EmbeddedFleet) -> None:
    seed = new_nkey_seed()
    expires = time.time() + 3
    body = {
        "vehicle_id": "car-lapsing",
        "nkey": public_nkey(seed),
        "owner": "embedded-fleet",
        "expires_at": expires,
    }
    fleet.post("/fleet/enrolments", body)
    cut: list[float] = []

    async def scenario() -> str:
        async def on_disconnect() -> None:
            cut.append(time.time())

        nc = await connect_as(fleet, "car-lapsing", seed, disconnected_cb=on_disconnect)
        try:
            while not cut and time.time() < expires + 10:
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
        inbox = subjects.inbox_prefix("car-lapsing")
        return await refusal(fleet, nkeys_seed_str=seed, inbox_prefix=inbox)

    again = asyncio.run(scenario())

    assert cut and cut[0] - expires < HEARTBEAT_S
    assert "Authorization Violation" in again


def test_a_car_cannot_aim_the_coordinators_answer_at_other_subjects(
    fleet: EmbeddedFleet,
) -> None:
    # A car chooses its messages' reply subject; coordinators may publish anywhere. An answer
    # on the JetStream API would purge the models bucket; on another car's downlink it would
    # speak for the cloud. The coordinator answers a car only in its own inbox.
    seed = fleet.enrol("car-aimer")
    before = fleet.get("/fleet/dispatch")["refused"].get("bad_reply", 0)

    async def scenario() -> None:
        nc = await connect_as(fleet, "car-aimer", seed)
        try:
            for reply in (
                "$JS.API.STREAM.PURGE.OBJ_idlefleet-models",
                subjects.downlink("car-001", Downlink.POLICY),
            ):
                await nc.publish(subjects.uplink("car-aimer", Uplink.HEARTBEAT), b"{}", reply)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(scenario())

    eventually(
        lambda: fleet.get("/fleet/dispatch")["refused"].get("bad_reply", 0) >= before + 2,
        10,
        "both answers withheld and counted",
    )

    async def release_pointer() -> str | None:
        nc = await nats.connect(fleet.nats_url, **fleet.nats_credentials)
        try:
            return await latest_digest(await models_bucket(nc.jetstream()), MINILM.id)
        finally:
            await nc.close()

    assert asyncio.run(release_pointer()) is not None  # the models bucket was not purged
