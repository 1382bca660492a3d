"""Signed model manifests: what a car may load, who vouched for it, and until when.

A `Manifest` lists a model's files by name, size and sha256, each file cut into parts of at most
`PART_BYTES` that travel as separate content-addressed objects, so an interrupted download
resumes at part granularity. The publisher signs the manifest's canonical JSON (`payload`) with
an Ed25519 key; a car loads nothing unless `verify` accepts it: signed by a key it trusts, not
expired, for the model it asked for, and not older than a version it has already accepted.
Payloads are parsed strictly (exact keys, types and ranges) and must be in canonical form, so
one manifest has exactly one payload and one digest. This module does no I/O beyond reading and
writing key files and hashing the files a manifest describes; moving bytes is `distribution`'s
job.

Errors form one tree, so a caller can refuse on the base class and log the reason::

    ManifestError
    ├── MalformedManifest   envelope or payload is not what this module writes
    ├── UnsignedOrForged    no signature, or it does not verify under the signer's key
    ├── UnknownSigner       signed by a key that is not trusted
    ├── Expired             past `expires`, or `created` too far in the future
    ├── Rollback            older than (or as old as, but different from) the version accepted
    ├── WrongModel          a manifest for another model than the one asked for
    └── TamperedModel       downloaded bytes do not hash to what the manifest signed
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "MAX_ENVELOPE_BYTES",
    "PART_BYTES",
    "Expired",
    "MalformedManifest",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "Part",
    "Rollback",
    "SignedManifest",
    "TamperedModel",
    "UnknownSigner",
    "UnsignedOrForged",
    "WrongModel",
    "check_rollback",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "manifest_for_files",
    "parse_payload",
    "public_key_bytes",
    "public_key_pem",
    "sign",
    "trusted_keys",
    "verify",
]

PART_BYTES = 8 * 1024 * 1024
"""Largest part a file is cut into; also the largest a car accepts in a manifest."""
MAX_ENVELOPE_BYTES = 1024 * 1024
"""A signed manifest is read whole into memory: anything larger is refused unread."""
MAX_CLOCK_SKEW_S = 300.0
"""How far in the future `created` may lie: a car's clock (no GPS fix, RTC drift) is not exact."""
MAX_FILES = 1024
SIGNATURE_BYTES = 64
KEY_ID_HEX = 16

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Model ids are catalog ids such as "all-MiniLM-L6-v2", possibly with an organisation prefix.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,127}")
# Versions and sizes must survive a JSON round trip through any implementation (doubles).
_MAX_INT = 2**53 - 1
_HASH_CHUNK = 1 << 20


class ManifestError(Exception):
    """Base class: a signed manifest, or bytes it describes, must not be used."""


class MalformedManifest(ManifestError):
    """The envelope or the payload is not in the exact form this module writes."""


class UnsignedOrForged(ManifestError):
    """The signature is missing or does not verify under the key the payload names."""


class UnknownSigner(ManifestError):
    """The payload names a signing key that is not among the trusted keys."""


class Expired(ManifestError):
    """The manifest is past its expiry, or was created implausibly far in the future."""


class Rollback(ManifestError):
    """The manifest is older than the newest version already accepted for its model."""


class WrongModel(ManifestError):
    """The manifest is for another model than the one requested."""


class TamperedModel(ManifestError):
    """Bytes received for a file do not match the size or sha256 the signed manifest lists."""

    def __init__(self, message: str, file_name: str) -> None:
        super().__init__(message)
        self.file_name = file_name


# -- value objects -------------------------------------------------------------------------------


def _check_sha256(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise MalformedManifest(f"{what} must be 64 lowercase hex digits, got {value!r}")


def _check_int(value: object, what: str, minimum: int) -> int:
    # bool is an int subclass: True must not pass as a size of 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedManifest(f"{what} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= _MAX_INT:
        raise MalformedManifest(f"{what} must be in [{minimum}, {_MAX_INT}], got {value}")
    return value


def _check_time(value: object, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedManifest(f"{what} must be a number of unix seconds")
    if not math.isfinite(value) or not 0 <= value <= _MAX_INT:
        raise MalformedManifest(f"{what} must be finite unix seconds, got {value}")
    return float(value)


@dataclass(frozen=True)
class Part:
    """One content-addressed slice of a file, stored and downloaded as its own object."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "part sha256")
        _check_int(self.size, "part size", 1)
        if self.size > PART_BYTES:
            raise MalformedManifest(f"part size {self.size} exceeds {PART_BYTES} bytes")


@dataclass(frozen=True)
class ManifestFile:
    """A file of the model: a plain name in the model's directory, its bytes, and its parts."""

    name: str
    size: int
    sha256: str
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        # The name becomes a path on the car: nothing that could leave the model's directory.
        if (
            not isinstance(self.name, str)
            or not _FILE_NAME.fullmatch(self.name)
            or self.name in (".", "..")
        ):
            raise MalformedManifest(
                f"file name {self.name!r} must be 1-128 characters of [A-Za-z0-9._-], not . or .."
            )
        _check_int(self.size, f"size of {self.name}", 0)
        _check_sha256(self.sha256, f"sha256 of {self.name}")
        if not isinstance(self.parts, tuple) or not all(isinstance(p, Part) for p in self.parts):
            raise MalformedManifest(f"parts of {self.name} must be a tuple of Part")
        total = sum(p.size for p in self.parts)
        if total != self.size:
            raise MalformedManifest(f"parts of {self.name} add up to {total}, not {self.size}")


@dataclass(frozen=True)
class Manifest:
    """What a publisher vouches for: one version of one model, valid from `created` to `expires`."""

    model: str
    version: int
    files: tuple[ManifestFile, ...]
    created: float
    expires: float
    key_id: str
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not _MODEL_ID.fullmatch(self.model):
            raise MalformedManifest(f"model id {self.model!r} is not a valid model id")
        _check_int(self.version, "version", 1)
        # Stored as floats so that the canonical form does not depend on how a caller typed them.
        object.__setattr__(self, "created", _check_time(self.created, "created"))
        object.__setattr__(self, "expires", _check_time(self.expires, "expires"))
        if self.expires <= self.created:
            raise MalformedManifest("expires must be later than created")
        if not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id):
            raise MalformedManifest(f"key_id must be {KEY_ID_HEX} lowercase hex digits")
        if not isinstance(self.files, tuple) or not all(
            isinstance(f, ManifestFile) for f in self.files
        ):
            raise MalformedManifest("files must be a tuple of ManifestFile")
        if not 1 <= len(self.files) <= MAX_FILES:
            raise MalformedManifest(f"a manifest lists 1 to {MAX_FILES} files")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise MalformedManifest("file names in a manifest must be unique")
        object.__setattr__(self, "digest", hashlib.sha256(self.payload()).hexdigest())

    def payload(self) -> bytes:
        """The canonical bytes that are signed: sorted keys, no spaces, ASCII only."""
        doc = {
            "model": self.model,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "key_id": self.key_id,
            "files": [
                {
                    "name": f.name,
                    "size": f.size,
                    "sha256": f.sha256,
                    "parts": [{"sha256": p.sha256, "size": p.size} for p in f.parts],
                }
                for f in self.files
            ],
        }
        return json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class SignedManifest:
    """A canonical manifest payload and the Ed25519 signature over exactly those bytes."""

    payload: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        """sha256 hex of the payload: the manifest's name in the object store."""
        return hashlib.sha256(self.payload).hexdigest()

    def to_bytes(self) -> bytes:
        envelope = {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        """Parse an envelope; says what is wrong with it through `MalformedManifest`.

        The signature is not checked here (that needs the trusted keys): see `verify`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedManifest(f"envelope must be bytes, got {type(data).__name__}")
        if len(data) > MAX_ENVELOPE_BYTES:
            raise MalformedManifest(
                f"envelope is {len(data)} bytes, more than the {MAX_ENVELOPE_BYTES} allowed"
            )
        try:
            doc = json.loads(bytes(data))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise MalformedManifest(f"envelope is not JSON: {error}") from None
        if not isinstance(doc, dict):
            raise MalformedManifest("envelope must be a JSON object")
        if set(doc) != {"payload", "signature"}:
            raise MalformedManifest(
                f"envelope must have exactly the keys payload and signature, has {sorted(doc)}"
            )
        return cls(_b64_field(doc, "payload"), _b64_field(doc, "signature"))


def _b64_field(doc: dict[str, Any], key: str) -> bytes:
    value = doc[key]
    if not isinstance(value, str):
        raise MalformedManifest(f"envelope {key} must be a base64 string")
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as error:
        raise MalformedManifest(f"envelope {key} is not valid base64: {error}") from None
    # b64decode ignores the unused low bits of the last character, so several strings decode to
    # the same bytes; only the canonical one is accepted, so that an envelope cannot be altered
    # and still pass.
    if base64.b64encode(decoded).decode("ascii") != value:
        raise MalformedManifest(f"envelope {key} is not canonical base64")
    return decoded


# -- parsing -------------------------------------------------------------------------------------


def _object(value: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedManifest(f"{what} must be a JSON object")
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise MalformedManifest(f"{what}: missing keys {missing}, unexpected keys {extra}")
    return value


def parse_payload(payload: bytes) -> Manifest:
    """The manifest in `payload`, parsed strictly; the signature is NOT checked here.

    Refuses unknown or missing keys, wrong types, and any payload that is not byte for byte the
    canonical form of what it parses to (so a manifest has exactly one digest).
    """
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MalformedManifest(f"payload is not JSON: {error}") from None
    top = _object(
        doc, {"model", "version", "files", "created", "expires", "key_id"}, "manifest payload"
    )
    if not isinstance(top["files"], list):
        raise MalformedManifest("files must be a JSON array")
    files = []
    for i, raw in enumerate(top["files"]):
        entry = _object(raw, {"name", "size", "sha256", "parts"}, f"files[{i}]")
        if not isinstance(entry["parts"], list):
            raise MalformedManifest(f"files[{i}].parts must be a JSON array")
        parts = tuple(
            Part(**_object(p, {"sha256", "size"}, f"files[{i}].parts[{j}]"))
            for j, p in enumerate(entry["parts"])
        )
        files.append(ManifestFile(entry["name"], entry["size"], entry["sha256"], parts))
    manifest = Manifest(
        model=top["model"],
        version=top["version"],
        files=tuple(files),
        created=top["created"],
        expires=top["expires"],
        key_id=top["key_id"],
    )
    if manifest.payload() != bytes(payload):
        raise MalformedManifest("payload is not in canonical form")
    return manifest


# -- signing and verification --------------------------------------------------------------------


def sign(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    """Sign the canonical payload; the manifest must name this key as its signer."""
    own_id = key_id(private_key.public_key())
    if manifest.key_id != own_id:
        raise ValueError(f"manifest names key {manifest.key_id}, but this key is {own_id}")
    payload = manifest.payload()
    return SignedManifest(payload, private_key.sign(payload))


def _claimed_key_id(payload: bytes) -> str | None:
    # Read before the signature is checked, only to pick the key to check it with.
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    claimed = doc.get("key_id") if isinstance(doc, dict) else None
    return claimed if isinstance(claimed, str) else None


def verify(
    signed: SignedManifest,
    trusted: Mapping[str, Ed25519PublicKey],
    now: float,
    min_version: int = 0,
    model: str | None = None,
    accepted_digest: str | None = None,
) -> Manifest:
    """The manifest in `signed`, if it may be used at time `now`; else a `ManifestError`.

    `trusted` maps key ids to public keys. `min_version` is the highest version already accepted
    for this model and `accepted_digest` that version's digest: a lower version is a rollback,
    and so is the same version with another digest (a second, different "version 3").
    The signature is checked before anything in the payload is believed.
    """
    if len(signed.signature) != SIGNATURE_BYTES:
        raise UnsignedOrForged(
            f"signature is {len(signed.signature)} bytes; an Ed25519 signature is {SIGNATURE_BYTES}"
        )
    claimed = _claimed_key_id(signed.payload)
    if claimed is None:
        raise UnsignedOrForged("payload does not name a signing key, so no signature can hold")
    public_key = trusted.get(claimed)
    if public_key is None:
        raise UnknownSigner(f"signed by key {claimed!r}, which is not trusted")
    try:
        public_key.verify(signed.signature, signed.payload)
    except InvalidSignature:
        raise UnsignedOrForged(f"signature does not verify under key {claimed}") from None
    manifest = parse_payload(signed.payload)
    if model is not None and manifest.model != model:
        raise WrongModel(f"manifest is for model {manifest.model!r}, not {model!r}")
    if now >= manifest.expires:
        raise Expired(
            f"manifest for {manifest.model} v{manifest.version} expired at "
            f"{manifest.expires:.0f} (now {now:.0f})"
        )
    if manifest.created > now + MAX_CLOCK_SKEW_S:
        raise Expired(
            f"manifest was created at {manifest.created:.0f}, more than {MAX_CLOCK_SKEW_S:.0f} s "
            f"after now ({now:.0f})"
        )
    check_rollback(manifest, min_version, accepted_digest)
    return manifest


def check_rollback(manifest: Manifest, min_version: int, accepted_digest: str | None) -> None:
    """Raise `Rollback` unless `manifest` is at least as new as the accepted version."""
    if manifest.version < min_version:
        raise Rollback(
            f"{manifest.model} v{manifest.version} is older than v{min_version}, already accepted"
        )
    if (
        manifest.version == min_version
        and accepted_digest is not None
        and manifest.digest != accepted_digest
    ):
        raise Rollback(
            f"{manifest.model} v{manifest.version} differs from the v{min_version} already "
            f"accepted (digest {accepted_digest[:12]}…): a version number is never reused"
        )


# -- keys ----------------------------------------------------------------------------------------


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256 of the raw public key: how a manifest names its signer."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:KEY_ID_HEX]


def public_key_pem(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), the format cars are given."""
    public = public_key.public_key() if isinstance(public_key, Ed25519PrivateKey) else public_key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 key, write it to `path` as PEM (PKCS8, mode 0600), and return it.

    Refuses to overwrite an existing file: losing a signing key strands every car that trusts
    only it.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL with the mode given at creation: the key is never readable by others, not even
    # between a create and a chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file at `path`."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ManifestError(f"{path} holds no unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path_or_raw: Path | str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file path, PEM bytes, or the raw 32 bytes."""
    data = path_or_raw if isinstance(path_or_raw, bytes) else Path(path_or_raw).read_bytes()
    if len(data) == 32 and not data.startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as error:
        raise ManifestError(f"not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestError(f"public key is a {type(key).__name__}, not Ed25519")
    return key


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """The mapping `verify` takes, from a list of public keys."""
    return {key_id(k): k for k in keys}


# -- building manifests --------------------------------------------------------------------------


def _describe_file(path: Path, part_bytes: int) -> ManifestFile:
    whole = hashlib.sha256()
    parts: list[Part] = []
    size = 0
    # Streamed: model weights are hundreds of MB and a publisher may run on a small machine.
    with open(path, "rb") as f:
        while True:
            part = hashlib.sha256()
            part_size = 0
            while part_size < part_bytes:
                chunk = f.read(min(_HASH_CHUNK, part_bytes - part_size))
                if not chunk:
                    break
                part.update(chunk)
                whole.update(chunk)
                part_size += len(chunk)
            if part_size == 0:
                break
            parts.append(Part(part.hexdigest(), part_size))
            size += part_size
    return ManifestFile(path.name, size, whole.hexdigest(), tuple(parts))


def manifest_for_files(
    model: str,
    version: int,
    paths: list[Path],
    created: float,
    ttl_s: float,
    key_id: str,
    part_bytes: int = PART_BYTES,
) -> Manifest:
    """Describe `paths` (named by their base names) as `version` of `model`, valid `ttl_s`."""
    if not 1 <= part_bytes <= PART_BYTES:
        raise ValueError(f"part_bytes must be in [1, {PART_BYTES}], got {part_bytes}")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    files = tuple(_describe_file(Path(p), part_bytes) for p in paths)
    return Manifest(model, version, files, created, created + ttl_s, key_id)
