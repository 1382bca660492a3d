"""Releasing a model (`models.release`) against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from idlefleet.embedded.nats_server import start_nats_server
from idlefleet.models.manifest import key_id
from idlefleet.models.release import current_release, release_model

T = TypeVar("T")
NOW = 1_800_000_000.0


def with_js(tmp_path: Path, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    server = start_nats_server(tmp_path / "nats")

    async def run() -> T:
        nc = await nats.connect(server.url)
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    finally:
        server.stop()


def files(tmp_path: Path, content: bytes) -> dict[str, Path]:
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    return {path.name: path}


def test_the_same_files_are_not_released_again_and_new_ones_get_the_next_version(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()

    async def scenario(js: JetStreamContext) -> list[Any]:
        first = await release_model(js, "m", files(tmp_path, b"v1" * 1000), key, 3600, NOW)
        again = await release_model(js, "m", files(tmp_path, b"v1" * 1000), key, 3600, NOW + 1)
        second = await release_model(js, "m", files(tmp_path, b"v2" * 1000), key, 3600, NOW + 2)
        return [first, again, second]

    first, again, second = with_js(tmp_path, scenario)

    assert first.manifest.version == 1 and first.published is not None
    assert again.published is None and again.digest == first.digest
    assert second.manifest.version == 2 and second.digest != first.digest


def test_a_release_after_an_expired_or_foreign_one_still_goes_up_in_version(
    tmp_path: Path,
) -> None:
    # Cars that accepted version N refuse anything lower as a rollback: replacing an expired
    # release, or one signed by a key since rotated out, must not start again at 1.
    old_key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    content = files(tmp_path, b"w" * 5000)

    async def scenario(js: JetStreamContext) -> list[Any]:
        await release_model(js, "m", content, old_key, 3600, NOW)
        await release_model(js, "m", files(tmp_path, b"x" * 5000), old_key, 3600, NOW + 1)
        expired = await release_model(js, "m", content, old_key, 3600, NOW + 7200)
        rotated = await release_model(js, "m", content, new_key, 3600, NOW + 7201)
        trusted = {key_id(new_key): new_key.public_key()}
        return [expired, rotated, await current_release(js, "m", trusted, NOW + 7202)]

    expired, rotated, current = with_js(tmp_path, scenario)

    assert expired.manifest.version == 3
    assert rotated.manifest.version == 4
    assert current is not None and current[0] == rotated.digest
