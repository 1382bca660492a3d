"""Signed manifests, without a network: signing, every refusal, strict parsing, key files."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.models.manifest import (
    MAX_CLOCK_SKEW_S,
    MAX_ENVELOPE_BYTES,
    PART_BYTES,
    Expired,
    MalformedManifest,
    Manifest,
    ManifestError,
    ManifestFile,
    Part,
    Rollback,
    SignedManifest,
    UnknownSigner,
    UnsignedOrForged,
    WrongModel,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    manifest_for_files,
    parse_payload,
    public_key_bytes,
    public_key_pem,
    sign,
    trusted_keys,
    verify,
)

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = trusted_keys([KEY.public_key()])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def a_manifest(**changes: Any) -> Manifest:
    data = b"weights"
    fields: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2",
        "version": 3,
        "files": (ManifestFile("model.safetensors", 7, sha(data), (Part(sha(data), 7),)),),
        "created": NOW - 60,
        "expires": NOW + 3600,
        "key_id": key_id(KEY),
    }
    fields.update(changes)
    return Manifest(**fields)


def signed_doc(doc: dict[str, Any], key: Ed25519PrivateKey = KEY) -> SignedManifest:
    """A payload built by hand (canonical JSON) and validly signed: for strict-parse tests."""
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return SignedManifest(payload, key.sign(payload))


def good_doc() -> dict[str, Any]:
    return json.loads(a_manifest().payload())


# -- round trips -----------------------------------------------------------------------------


def test_a_signed_manifest_verifies_to_itself() -> None:
    manifest = a_manifest()

    accepted = verify(sign(manifest, KEY), TRUSTED, now=NOW, model="all-MiniLM-L6-v2")

    assert accepted == manifest
    assert accepted.digest == sha(manifest.payload())


def test_the_envelope_round_trips() -> None:
    signed = sign(a_manifest(), KEY)

    again = SignedManifest.from_bytes(signed.to_bytes())

    assert again == signed and again.digest == signed.digest


def test_the_payload_is_canonical_json_with_sorted_keys() -> None:
    payload = a_manifest().payload()

    assert (
        payload == json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode()
    )
    assert parse_payload(payload) == a_manifest()


def test_times_given_as_ints_give_the_same_digest_as_floats() -> None:
    assert a_manifest(created=int(NOW)).digest == a_manifest(created=NOW).digest


def test_manifest_for_files_cuts_parts_and_hashes_whole_files(tmp_path: Path) -> None:
    sizes = {"exact": 3 * 1000, "rest": 2500, "empty": 0}
    paths = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
        paths.append(tmp_path / name)

    manifest = manifest_for_files("m", 1, paths, NOW, 60, key_id(KEY), part_bytes=1000)

    by_name = {f.name: f for f in manifest.files}
    for name, size in sizes.items():
        data = (tmp_path / name).read_bytes()
        entry = by_name[name]
        assert (entry.size, entry.sha256) == (size, sha(data))
        cuts = [data[i : i + 1000] for i in range(0, size, 1000)]
        assert entry.parts == tuple(Part(sha(c), len(c)) for c in cuts)
    assert manifest.expires == NOW + 60


def test_part_bytes_larger_than_a_car_accepts_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="part_bytes"):
        manifest_for_files("m", 1, [tmp_path / "f"], NOW, 60, key_id(KEY), PART_BYTES + 1)


def test_sign_refuses_a_manifest_naming_another_key() -> None:
    with pytest.raises(ValueError, match="names key"):
        sign(a_manifest(key_id=key_id(OTHER_KEY)), KEY)


# -- refusals --------------------------------------------------------------------------------


def test_an_unsigned_manifest_is_refused() -> None:
    unsigned = SignedManifest(a_manifest().payload(), b"")

    with pytest.raises(UnsignedOrForged, match="0 bytes"):
        verify(unsigned, TRUSTED, now=NOW)


def test_a_forged_signature_is_refused() -> None:
    manifest = a_manifest()
    forged = SignedManifest(manifest.payload(), KEY.sign(a_manifest(version=4).payload()))

    with pytest.raises(UnsignedOrForged, match="does not verify"):
        verify(forged, TRUSTED, now=NOW)


def test_a_manifest_signed_by_an_untrusted_key_is_refused() -> None:
    theirs = sign(a_manifest(key_id=key_id(OTHER_KEY)), OTHER_KEY)

    with pytest.raises(UnknownSigner, match=key_id(OTHER_KEY)):
        verify(theirs, TRUSTED, now=NOW)


def test_a_manifest_naming_a_trusted_key_but_signed_by_another_is_refused() -> None:
    payload = a_manifest().payload()

    with pytest.raises(UnsignedOrForged):
        verify(SignedManifest(payload, OTHER_KEY.sign(payload)), TRUSTED, now=NOW)


def test_a_payload_that_names_no_key_is_refused_as_unsigned() -> None:
    payload = b"not json at all"

    with pytest.raises(UnsignedOrForged, match="does not name"):
        verify(SignedManifest(payload, KEY.sign(payload)), TRUSTED, now=NOW)


@pytest.mark.parametrize(
    ("now", "message"),
    [
        (NOW + 3600, "expired"),
        (NOW + 10**6, "expired"),
        (NOW - 60 - MAX_CLOCK_SKEW_S - 1, "in the future|after now"),
    ],
)
def test_expired_or_future_manifests_are_refused(now: float, message: str) -> None:
    with pytest.raises(Expired, match=message):
        verify(sign(a_manifest(), KEY), TRUSTED, now=now)


def test_a_manifest_created_slightly_in_the_future_is_accepted() -> None:
    # A car's clock may be a few minutes behind the publisher's.
    verify(sign(a_manifest(), KEY), TRUSTED, now=NOW - 60 - MAX_CLOCK_SKEW_S + 1)


def test_an_older_version_is_a_rollback() -> None:
    with pytest.raises(Rollback, match="older than v4"):
        verify(sign(a_manifest(version=3), KEY), TRUSTED, now=NOW, min_version=4)


def test_the_same_version_with_another_digest_is_a_rollback() -> None:
    accepted = a_manifest(expires=NOW + 7200)

    with pytest.raises(Rollback, match="never reused"):
        verify(
            sign(a_manifest(), KEY),
            TRUSTED,
            now=NOW,
            min_version=3,
            accepted_digest=accepted.digest,
        )


def test_the_same_version_and_digest_and_newer_versions_are_accepted() -> None:
    same = a_manifest()
    verify(sign(same, KEY), TRUSTED, now=NOW, min_version=3, accepted_digest=same.digest)
    verify(sign(a_manifest(version=4), KEY), TRUSTED, now=NOW, min_version=3, accepted_digest="0")


def test_a_manifest_for_another_model_is_refused() -> None:
    with pytest.raises(WrongModel, match="SmolLM2-135M-Instruct"):
        verify(sign(a_manifest(), KEY), TRUSTED, now=NOW, model="SmolLM2-135M-Instruct")


# -- strict parsing --------------------------------------------------------------------------


def _mutate(path: tuple[str | int, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    doc = good_doc()
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


BAD_PAYLOADS = {
    "extra key": _mutate(("note",), "hi"),
    "missing key": _mutate(("expires",), None, delete=True),
    "version zero": _mutate(("version",), 0),
    "version bool": _mutate(("version",), True),
    "version float": _mutate(("version",), 3.0),
    "version string": _mutate(("version",), "3"),
    "files not a list": _mutate(("files",), {}),
    "no files": _mutate(("files",), []),
    "name with slash": _mutate(("files", 0, "name"), "a/b"),
    "name dotdot": _mutate(("files", 0, "name"), ".."),
    "name too long": _mutate(("files", 0, "name"), "a" * 129),
    "size negative": _mutate(("files", 0, "size"), -1),
    "size bool": _mutate(("files", 0, "size"), True),
    "sha uppercase": _mutate(("files", 0, "sha256"), sha(b"weights").upper()),
    "parts do not add up": _mutate(("files", 0, "size"), 8),
    "part too large": _mutate(("files", 0, "parts", 0, "size"), PART_BYTES + 1),
    "part extra key": _mutate(("files", 0, "parts", 0, "offset"), 0),
    "expires before created": _mutate(("expires",), NOW - 120),
    "model id with spaces": _mutate(("model",), "all MiniLM"),
}


@pytest.mark.parametrize("doc", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_a_validly_signed_but_malformed_payload_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(MalformedManifest):
        verify(signed_doc(doc), TRUSTED, now=NOW)


def test_duplicate_file_names_are_refused() -> None:
    doc = good_doc()
    doc["files"].append(doc["files"][0])

    with pytest.raises(MalformedManifest, match="unique"):
        verify(signed_doc(doc), TRUSTED, now=NOW)


def test_a_non_canonical_payload_is_refused_even_when_signed() -> None:
    payload = json.dumps(good_doc(), sort_keys=True, indent=1).encode()

    with pytest.raises(MalformedManifest, match="canonical"):
        verify(SignedManifest(payload, KEY.sign(payload)), TRUSTED, now=NOW)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_ENVELOPES = {
    "too large": (b" " * (MAX_ENVELOPE_BYTES + 1), "more than"),
    "not json": (b"{payload", "not JSON"),
    "not utf-8": (b"\xff\xfe", "not JSON"),
    "array": (b"[]", "JSON object"),
    "missing signature": (json.dumps({"payload": b64(b"x")}).encode(), "exactly the keys"),
    "extra key": (
        json.dumps({"payload": b64(b"x"), "signature": b64(b"y"), "alg": "none"}).encode(),
        "exactly the keys",
    ),
    "payload not a string": (
        json.dumps({"payload": 1, "signature": b64(b"y")}).encode(),
        "base64 string",
    ),
    "bad base64": (json.dumps({"payload": "!!", "signature": b64(b"y")}).encode(), "base64"),
    "non-canonical base64": (
        json.dumps({"payload": "eB==", "signature": b64(b"y")}).encode(),
        "canonical",
    ),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
}


@pytest.mark.parametrize(("data", "message"), BAD_ENVELOPES.values(), ids=BAD_ENVELOPES.keys())
def test_a_malformed_envelope_says_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(MalformedManifest, match=message):
        SignedManifest.from_bytes(data)


def test_a_malformed_key_id_is_refused() -> None:
    with pytest.raises(MalformedManifest, match="key_id"):
        a_manifest(key_id="ABC")


def test_file_names_that_could_leave_the_model_directory_are_refused() -> None:
    for name in ("../x", "a/b", "", ".", "..", "a\\b", "ü"):
        with pytest.raises(MalformedManifest):
            ManifestFile(name, 0, sha(b""), ())


@settings(max_examples=300, deadline=None)
@given(data=st.data(), in_signature=st.booleans())
def test_any_single_flipped_byte_is_refused(data: st.DataObject, in_signature: bool) -> None:
    signed = sign(a_manifest(), KEY)
    target = bytearray(signed.signature if in_signature else signed.payload)
    index = data.draw(st.integers(0, len(target) - 1))
    target[index] ^= data.draw(st.integers(1, 255))
    flipped = (
        dataclasses.replace(signed, signature=bytes(target))
        if in_signature
        else dataclasses.replace(signed, payload=bytes(target))
    )

    with pytest.raises((UnsignedOrForged, UnknownSigner)):
        verify(flipped, TRUSTED, now=NOW)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_flipped_byte_in_the_envelope_is_refused(data: st.DataObject) -> None:
    envelope = bytearray(sign(a_manifest(), KEY).to_bytes())
    index = data.draw(st.integers(0, len(envelope) - 1))
    envelope[index] ^= data.draw(st.integers(1, 255))

    with pytest.raises(ManifestError):
        verify(SignedManifest.from_bytes(bytes(envelope)), TRUSTED, now=NOW)


# -- keys ------------------------------------------------------------------------------------


def test_a_generated_key_is_private_to_its_owner_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"

    key = generate_signing_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(key)


def test_generating_a_key_never_overwrites_one(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    generate_signing_key(path)
    before = path.read_bytes()

    with pytest.raises(FileExistsError):
        generate_signing_key(path)
    assert path.read_bytes() == before


def test_public_keys_load_from_a_pem_file_pem_bytes_or_raw_bytes(tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_bytes(public_key_pem(KEY))
    raw = public_key_bytes(KEY)

    loaded = [
        load_public_key(tmp_path / "signing.pub"),
        load_public_key(str(tmp_path / "signing.pub")),
        load_public_key(public_key_pem(KEY)),
        load_public_key(raw),
    ]

    assert all(public_key_bytes(k) == raw for k in loaded)
    assert key_id(KEY) == sha(raw)[:16] == key_id(KEY.public_key())


def test_keys_of_another_algorithm_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    with pytest.raises(ManifestError, match="not an Ed25519"):
        load_private_key(tmp_path / "ec.pem")
    with pytest.raises(ManifestError, match="not Ed25519"):
        load_public_key(ec_public)
    with pytest.raises(ManifestError, match="not a PEM"):
        load_public_key(b"garbage that is not 32 bytes long")
