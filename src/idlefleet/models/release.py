"""Releasing a model to the fleet, and knowing which release is current.

The operator's side of `idlefleet.models.distribution`: `release_model` signs a manifest of a
model's files (the data the car builds its ONNX graph from: MiniLM's safetensors, tokenizer
and config; SmolLM2's GGUF — never code) with the operator's offline Ed25519 key and publishes
it, unless the bucket's current release already has exactly these files. `current_release`
reads the ``latest`` pointer and checks the manifest it names (signature, expiry, model), as a
coordinator does before it names a digest in its work grants.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from idlefleet.models.distribution import (
    PublishReport,
    latest_digest,
    manifest_object_name,
    models_bucket,
    publish_model,
)
from idlefleet.models.manifest import (
    MAX_ENVELOPE_BYTES,
    MalformedManifest,
    Manifest,
    ManifestError,
    SignedManifest,
    key_id,
    manifest_for_files,
    parse_payload,
    sign,
    verify,
)

__all__ = ["Release", "current_release", "release_model"]

DEFAULT_TTL_S = 90 * 86_400.0
"""A release is valid for 90 days unless released again: a car will not fetch or load a stale
release that an attacker keeps replaying after the operator stopped signing it. (A car keeps
running the release it loaded; coordinators stop naming an expired release in grants.)"""


@dataclass(frozen=True)
class Release:
    digest: str
    manifest: Manifest
    published: PublishReport | None
    """None: the current release already had these files; nothing was uploaded."""


async def read_manifest(obs: ObjectStore, digest: str) -> SignedManifest:
    sink = io.BytesIO()
    info = await obs.get_info(manifest_object_name(digest))
    if info.size is None or info.size > MAX_ENVELOPE_BYTES:
        raise MalformedManifest(f"manifest {digest} is {info.size} bytes")
    await obs.get(manifest_object_name(digest), writeinto=sink)
    signed = SignedManifest.from_bytes(sink.getvalue())
    if signed.digest != digest:
        raise MalformedManifest(f"the object named {digest} holds manifest {signed.digest}")
    return signed


async def current_release(
    js: JetStreamContext, model: str, trusted: Mapping[str, Ed25519PublicKey], now: float
) -> tuple[str, Manifest] | None:
    """The verified current release of ``model`` (digest, manifest), or None if there is none;
    a `ManifestError` if the pointer names something no trusted key signed."""
    obs = await models_bucket(js)
    digest = await latest_digest(obs, model)
    if digest is None:
        return None
    signed = await read_manifest(obs, digest)
    return digest, verify(signed, trusted, now=now, model=model)


async def release_model(
    js: JetStreamContext,
    model: str,
    files: Mapping[str, Path],
    key: Ed25519PrivateKey,
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
) -> Release:
    """Sign and publish ``files`` as the next version of ``model``; nothing new if the current
    release (signed by this key, valid for at least half its life) has the same files."""
    now = time.time() if now is None else now
    await models_bucket(js, create=True)
    trusted = {key_id(key): key.public_key()}
    version = 1
    wanted = manifest_for_files(model, 1, _named(files), now, ttl_s, key_id(key))
    try:
        found = await current_release(js, model, trusted, now)
    except ManifestError:
        # Expired, or another (e.g. rotated-out) key's: replaced by this key's release, whose
        # version must still be above it, or every car that accepted it refuses the new one
        # as a rollback. Its version number is read without trusting anything else in it.
        found = None
        version = await _unverified_version(js, model) + 1
    if found is not None:
        digest, manifest = found
        fresh = manifest.expires - now > ttl_s / 2
        if fresh and _same_files(manifest, wanted):
            return Release(digest, manifest, None)
        version = manifest.version + 1
    manifest = manifest_for_files(model, version, _named(files), now, ttl_s, key_id(key))
    signed = sign(manifest, key)
    report = await publish_model(js, signed, files)
    return Release(signed.digest, manifest, report)


async def _unverified_version(js: JetStreamContext, model: str) -> int:
    obs = await models_bucket(js)
    digest = await latest_digest(obs, model)
    if digest is None:
        return 0
    return parse_payload((await read_manifest(obs, digest)).payload).version


def _named(files: Mapping[str, Path]) -> list[Path]:
    for name, path in files.items():
        if path.name != name:
            raise ValueError(f"file {path} must be named {name} in the manifest")
    return list(files.values())


def _same_files(a: Manifest, b: Manifest) -> bool:
    return {(f.name, f.sha256) for f in a.files} == {(f.name, f.sha256) for f in b.files}
