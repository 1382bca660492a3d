"""Signed models over the air, through the real stack: the fleet releases MiniLM signed by its
operator key into the JetStream object store; the agent fetches and verifies it with its own
(read-only) NATS credentials before loading anything; grants name the release by digest, and
a new release reaches a running car; a release signed by another key is refused."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from openai import OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.models.catalog import MINILM
from idlefleet.models.distribution import models_bucket, part_object_name, publish_model
from idlefleet.models.manifest import key_id, load_public_key, manifest_for_files, sign
from idlefleet.models.release import current_release
from idlefleet.protocol import subjects
from idlefleet.workloads import for_model
from tests.integration.conftest import submit, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(data_dir=tmp_path_factory.mktemp("signed-models"), agents=1)
    with EmbeddedFleet(options) as running:
        yield running


@pytest.fixture(scope="module")
def sdk(fleet: EmbeddedFleet) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0) as made:
        yield made


def run_batch(sdk: OpenAI, texts: list[str], within: float) -> Any:
    return wait_for(sdk, submit(sdk, batch_input(texts)).id, within)


def eventually(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.2)


async def in_bucket(fleet: EmbeddedFleet, work: Any) -> Any:
    nc = await nats.connect(fleet.nats_url, **fleet.publisher_credentials)
    try:
        return await work(nc.jetstream())
    finally:
        await nc.close()


def current(fleet: EmbeddedFleet) -> tuple[str, Any]:
    trusted_key = load_public_key(fleet.secrets.signing_public_key_file)
    trusted = {key_id(trusted_key): trusted_key}
    found = asyncio.run(
        in_bucket(fleet, lambda js: current_release(js, MINILM.id, trusted, time.time()))
    )
    assert found is not None
    return found


def publish(fleet: EmbeddedFleet, key: Ed25519PrivateKey, version: int) -> str:
    """A release of MiniLM's files as ``version``, signed by ``key``; its digest."""
    workload = for_model(MINILM.id)
    assert workload is not None
    files = workload.model_files(MINILM.id)
    manifest = manifest_for_files(
        MINILM.id, version, list(files.values()), time.time(), 3600, key_id(key)
    )
    signed = sign(manifest, key)
    asyncio.run(in_bucket(fleet, lambda js: publish_model(js, signed, files)))
    return signed.digest


def test_the_car_runs_the_release_it_fetched_and_verified(
    fleet: EmbeddedFleet, sdk: OpenAI
) -> None:
    digest, manifest = current(fleet)

    batch = run_batch(sdk, ["signed"], 60)

    log = (fleet.log_dir / "agent-car-001.log").read_text()
    assert fleet.get("/fleet/dispatch")["model_releases"] == {MINILM.id: digest}
    assert "now runs release" not in log  # it already held what the grants named
    assert batch.status == "completed"
    assert f"release {digest[:12]} (version {manifest.version})" in log
    assert {f.name for f in manifest.files} == {
        "model.safetensors",
        "tokenizer.json",
        "config.json",
    }


def test_a_car_may_read_the_models_bucket_but_not_write_it(fleet: EmbeddedFleet) -> None:
    seed = fleet.enrol("car-reader")
    errors: list[str] = []

    async def scenario() -> int:
        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(
            fleet.nats_url,
            nkeys_seed_str=seed,
            inbox_prefix=subjects.inbox_prefix("car-reader"),
            error_cb=on_error,
        )
        try:
            bucket = await models_bucket(nc.jetstream())
            info = await bucket.get_info(f"latest.{MINILM.id}")
            with pytest.raises((nats.errors.Error, asyncio.TimeoutError, TimeoutError)):
                await bucket.put(f"latest.{MINILM.id}", b"0" * 64)
            return int(info.size or 0)
        finally:
            await nc.close()

    size = asyncio.run(scenario())

    assert size == 64  # it read the pointer ...
    assert any("permissions violation" in e and "$o.idlefleet-models" in e.lower() for e in errors)


def test_a_new_release_reaches_a_running_car(fleet: EmbeddedFleet, sdk: OpenAI) -> None:
    from idlefleet.models.manifest import load_private_key

    old, manifest = current(fleet)
    key = load_private_key(fleet.secrets.folder / "model-signing.pem")
    new = publish(fleet, key, manifest.version + 1)
    eventually(lambda: current(fleet)[0] == new, 5, "the pointer moves")
    eventually(
        lambda: fleet.get("/fleet/dispatch")["model_releases"].get(MINILM.id) == new,
        30,
        "the coordinator names the new release in its grants",
    )

    # The car gives the first unit of the new release back, fetches the release (its files
    # are all held: no bytes move), swaps its runner and takes the work again.
    started = time.monotonic()
    batch = run_batch(sdk, ["a", "new", "one"], 90)

    log = (fleet.log_dir / "agent-car-001.log").read_text()
    assert batch.status == "completed", f"{batch} after {time.monotonic() - started:.0f} s"
    assert f"now runs release {new[:12]}" in log
    assert old != new


def test_a_tampered_release_is_refused_by_the_running_car_and_counted(
    fleet: EmbeddedFleet, sdk: OpenAI, tmp_path: Path
) -> None:
    from idlefleet.models.manifest import load_private_key

    held, manifest = current(fleet)
    key = load_private_key(fleet.secrets.folder / "model-signing.pem")
    workload = for_model(MINILM.id)
    assert workload is not None
    extra = tmp_path / "extra.bin"
    extra.write_bytes(os.urandom(1 << 20))
    files = {**workload.model_files(MINILM.id), "extra.bin": extra}
    release = manifest_for_files(
        MINILM.id, manifest.version + 1, list(files.values()), time.time(), 3600, key_id(key)
    )
    signed = sign(release, key)
    (part,) = next(f for f in release.files if f.name == "extra.bin").parts
    tampered = bytearray(extra.read_bytes())
    tampered[100] ^= 1  # one flipped byte, put back under the part's content address

    async def publish_and_tamper(js: Any) -> None:
        await publish_model(js, signed, files)
        await (await models_bucket(js)).put(part_object_name(part.sha256), bytes(tampered))

    asyncio.run(in_bucket(fleet, publish_and_tamper))
    eventually(
        lambda: fleet.get("/fleet/dispatch")["model_releases"].get(MINILM.id) == signed.digest,
        30,
        "the coordinator names the (validly signed) release",
    )
    batch = submit(sdk, batch_input(["never", "on", "tampered", "bytes"]))

    def counted() -> int:
        by_car = fleet.get("/fleet/security").get("model_releases_refused_by_cars", {})
        return int(by_car.get("car-001", 0))

    eventually(lambda: counted() >= 1, 60, "car-001 reports the refusal")
    log = (fleet.log_dir / "agent-car-001.log").read_text()
    assert "release refused (TamperedModel)" in log
    assert f"now runs release {signed.digest[:12]}" not in log
    assert sdk.batches.retrieve(batch.id).request_counts.completed == 0  # nothing ran on it
    sdk.batches.cancel(batch.id)
    assert held != signed.digest


def test_a_release_signed_by_another_key_is_refused_by_a_new_car(
    fleet: EmbeddedFleet, sdk: OpenAI
) -> None:
    _, manifest = current(fleet)
    foreign = publish(fleet, Ed25519PrivateKey.generate(), manifest.version + 1)

    process = fleet.add_agent("car-wary")
    fleet._killed.add(process.pid)  # its exit is the point, not a failure of the fleet
    process.wait(60)

    log = (fleet.log_dir / "agent-car-wary.log").read_text()
    assert process.returncode != 0
    assert "UnknownSigner" in log, log[-2000:]
    # The coordinators check the release as a car does, refuse it too, and count it.
    eventually(
        lambda: (
            fleet.get("/fleet/security").get("model_releases_refused", {}).get("UnknownSigner", 0)
            == 1
        ),
        30,
        "the coordinator counts the foreign release once",
    )
    # The running car keeps the release it holds; grants name no release while the current
    # one is not the operator's, and the work still gets done.
    batch = run_batch(sdk, ["still"], 60)
    assert batch.status == "completed"
    assert (
        f"now runs release {foreign[:12]}" not in (fleet.log_dir / "agent-car-001.log").read_text()
    )
