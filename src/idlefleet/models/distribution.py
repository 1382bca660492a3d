"""Over-the-air model delivery through the NATS JetStream object store, verified on the car.

The publisher (`publish_model`) uploads each file part as a content-addressed object
`part.<sha256>` (a part the bucket already holds is not sent again), the signed manifest as
`manifest.<digest>`, and a pointer `latest.<model>` holding the newest manifest's digest. The car
(`ModelFetcher`) trusts nothing it reads from the bucket: the manifest must hash to the digest it
asked for and pass `manifest.verify` (trusted signer, not expired, no rollback) before any part
is downloaded, and every part and every assembled file must hash to what the manifest signed
before it is kept under its name. Files land in ``cache_dir/files/<sha256>`` and parts in
``cache_dir/parts/<sha256>``, both written to a temporary name and renamed, so several agent
processes can share one cache and a download killed midway resumes from its finished parts.

A car reads the bucket with JetStream direct gets and nothing else (`ModelBucket`): its NATS
permissions allow no stream info and no consumers (see `idlefleet.coordinator.nats_auth`).
Objects are read into files, in batches of chunks, never whole into memory unless small.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, cast

import nats.errors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    BadObjectMetaError,
    DigestMismatchError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.object_store import ObjectStore

from idlefleet.models.manifest import (
    MAX_ENVELOPE_BYTES,
    MalformedManifest,
    Manifest,
    ManifestFile,
    Part,
    SignedManifest,
    TamperedModel,
    check_rollback,
    parse_payload,
    verify,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MODELS_BUCKET",
    "DistributionError",
    "DownloadFailed",
    "FetchedModel",
    "ModelBucket",
    "ModelFetcher",
    "ObjectMissing",
    "PublishReport",
    "latest_digest",
    "manifest_object_name",
    "models_bucket",
    "part_object_name",
    "pointer_object_name",
    "publish_model",
]

MODELS_BUCKET = "idlefleet-models"
DEFAULT_CHUNK_BYTES = 1024 * 1024
"""Object store chunk size for uploads. Each chunk is one NATS message, so it must not exceed the
server's max_payload (1 MiB by default, 8 MiB in `idlefleet.embedded`); fewer, larger chunks
mean fewer publish round trips."""
STATE_FILE = "accepted.json"
STALE_TEMP_S = 3600.0
"""A temporary file untouched this long was left by a killed process, not one still writing."""
_TEMP_SUFFIX = ".partial"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_POINTER_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_COPY_CHUNK = 1 << 20
_POINTER_MAX_BYTES = 128
_FETCH_ROUNDS = 3
CHUNK_TIMEOUT_S = 30.0
"""Longest wait for the next chunk of an object before the transfer counts as broken."""
DIRECT_BATCH_BYTES = 16 * 1024 * 1024
"""Chunk bytes asked for per direct-get batch (the server may overshoot it by one chunk).
A batch is buffered in the client and the server until read: with chunks of at most 8 MiB this
stays well under the server's 64 MiB per-connection limit, past which it drops the client."""
_DIRECT_BATCH_MSGS = 4096  # not the limit in practice: DIRECT_BATCH_BYTES is
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Direct get answers: a status in the header for anything but a message.
_END_OF_BATCH = "204"
_NOT_FOUND = "404"
_NO_RESPONDERS = "503"
_NUM_PENDING = "Nats-Num-Pending"
_LAST_SEQUENCE = "Nats-Last-Sequence"


class DistributionError(Exception):
    """Moving model bytes failed for a reason that is not about trust (see `ManifestError`)."""


class ObjectMissing(DistributionError):
    """The bucket holds no object by the name a manifest or pointer leads to."""


class DownloadFailed(DistributionError):
    """The server or the connection failed mid-transfer; finished parts are kept for a retry."""


def part_object_name(sha256: str) -> str:
    return f"part.{sha256}"


def manifest_object_name(digest: str) -> str:
    return f"manifest.{digest}"


def pointer_object_name(model: str) -> str:
    # Object names allow fewer characters than model ids; a collision between two sanitised ids
    # is harmless because the pointer is only a hint and `fetch_latest` checks the model.
    return f"latest.{_POINTER_UNSAFE.sub('_', model)}"


def _store_digest(sha256_hex: str) -> str:
    # The object store records "SHA-256=<urlsafe base64>" of the object's bytes in its metadata.
    return "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


class ModelBucket(ObjectStore):
    """The models bucket, read with JetStream direct gets only: all that a car may ask of it.

    A car's NATS permissions (`idlefleet.coordinator.nats_auth`) allow it one request subject,
    ``$JS.API.DIRECT.GET.<stream>``: no stream info, no consumers. (A consumer's deliver subject
    is not checked against its creator's permissions: a car that may create consumers can have
    the server push the stream onto any subject.) So reads bypass nats-py's object store:

    * `get_info`: ``{"last_by_subj": "$O.<bucket>.M.<base64 name>"}``, the object's metadata;
    * `get`: the metadata, then the chunks on ``$O.<bucket>.C.<nuid>`` in batches,
      ``{"seq": s, "next_by_subj": <chunk subject>, "batch": n, "max_bytes": b}``. The server
      answers with the matching messages from ``s`` on, up to ``b`` bytes, then an end-of-batch
      message saying how many are still pending and the last sequence it sent; the next batch
      starts after that. Chunks of one object need not be consecutive in the stream. One
      request per ``batch_bytes`` bounds what is buffered for a slow link and costs little
      speed: one car fetches the 91 MB MiniLM weights in ~0.7 s on loopback, verification
      included (``bench/model_distribution.py``).

    Every byte is hashed and checked against the object's metadata digest (raising
    `DigestMismatchError`); `ModelFetcher` then checks it against the signed manifest, which is
    what it trusts. A bucket that ends short of the size its metadata gives (an object replaced
    while read) raises `DownloadFailed`. Object links are refused: `publish_model` never makes
    them, and following one would need another bucket. Writes (``put``, ``delete``) are
    nats-py's and need the publisher's permissions. The stream must allow direct gets:
    nats-py's ``create_object_store`` sets that, and `models_bucket` with ``create`` sets it on a
    bucket that lacks it.
    """

    def __init__(
        self,
        name: str,
        stream: str,
        js: JetStreamContext,
        *,
        batch_bytes: int = DIRECT_BATCH_BYTES,
    ) -> None:
        if not _BUCKET_NAME.fullmatch(name):
            raise ValueError(f"not an object store bucket name: {name!r}")
        super().__init__(name=name, stream=stream, js=js)
        # nats-py 2.16 has no batched direct get, and puts last_by_subj in the request's
        # subject (a second subject to permit): requests are sent here, on the context's own
        # connection, API prefix and timeout.
        self._nc = js._nc
        self._direct_subject = f"{js._prefix}.DIRECT.GET.{stream}"
        self._timeout_s = js._timeout
        self._batch_bytes = batch_bytes
        self._meta_prefix = f"$O.{name}.M."
        self._chunk_prefix = f"$O.{name}.C."

    async def answers(self) -> bool:
        """Whether the bucket's stream answers direct gets: a car's view of "it exists".

        False if nobody answers (no such stream, or one that does not allow direct gets).
        """
        try:
            await self._direct_get({"seq": 1, "next_by_subj": self._meta_prefix + ">"})
        except NotFoundError:
            return True  # the stream answered: it holds no objects yet
        except nats.errors.NoRespondersError:
            return False
        return True

    async def get_info(self, name: str, show_deleted: bool | None = False) -> api.ObjectInfo:
        encoded = base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")
        try:
            msg = await self._direct_get({"last_by_subj": self._meta_prefix + encoded})
        except NotFoundError:
            raise ObjectNotFoundError from None
        try:
            info = api.ObjectInfo.from_response(json.loads(msg.data))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise BadObjectMetaError(f"metadata of {name}: {error}") from None
        if info.deleted and not show_deleted:
            raise ObjectNotFoundError
        return info

    async def get(
        self,
        name: str,
        writeinto: io.BufferedIOBase | None = None,
        show_deleted: bool | None = False,
    ) -> ObjectStore.ObjectResult:
        info = await self.get_info(name, show_deleted)
        if info.is_link():
            raise BadObjectMetaError(f"{name} is a link, which no publisher of models makes")
        if not info.nuid:
            raise BadObjectMetaError(f"{name} has no chunk id")
        result = ObjectStore.ObjectResult(info=info)
        size = info.size or 0
        if not size:
            return result
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        received = 0
        loop = asyncio.get_running_loop()
        subject = self._chunk_prefix + info.nuid
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            seq, pending = 1, 1
            while pending:
                request = {
                    "seq": seq,
                    "next_by_subj": subject,
                    "batch": _DIRECT_BATCH_MSGS,
                    "max_bytes": self._batch_bytes,
                }
                await self._nc.publish(
                    self._direct_subject, json.dumps(request).encode(), reply=inbox
                )
                while True:
                    msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
                    status = _status(msg)
                    if status == _END_OF_BATCH:
                        pending = _header_int(msg, _NUM_PENDING)
                        seq = _header_int(msg, _LAST_SEQUENCE) + 1
                        break
                    if status == _NOT_FOUND:  # no chunk at or after seq
                        pending = 0
                        break
                    if status is not None:
                        _raise_for_status(msg)
                    received += len(msg.data)
                    if received > size:  # more than the metadata gives: never buffered
                        raise DigestMismatchError
                    digest.update(msg.data)
                    if writeinto is None:
                        chunks.append(msg.data)
                    else:
                        # The write may block on disk: off the event loop, as nats-py does.
                        await loop.run_in_executor(None, writeinto.write, msg.data)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if received < size:
            raise DownloadFailed(
                f"{name}: the bucket held {received} of its {size} bytes (replaced while read?)"
            )
        if info.digest != _store_digest(digest.hexdigest()):
            raise DigestMismatchError
        if writeinto is None:
            result.data = b"".join(chunks)
        return result

    async def _direct_get(self, request: Mapping[str, Any]) -> Msg:
        """One message by direct get; `NotFoundError` if there is none, `NoRespondersError` if
        the stream does not answer."""
        msg = await self._nc.request(
            self._direct_subject, json.dumps(request).encode(), timeout=self._timeout_s
        )
        status = _status(msg)
        if status == _NOT_FOUND:
            raise NotFoundError
        if status is not None:
            _raise_for_status(msg)
        return msg


def _status(msg: Msg) -> str | None:
    return msg.headers.get(api.Header.STATUS) if msg.headers else None


def _header_int(msg: Msg, name: str) -> int:
    value = (msg.headers or {}).get(name, "")
    if not value.isdigit():
        raise APIError(description=f"direct get answer with {name} {value!r}")
    return int(value)


def _raise_for_status(msg: Msg) -> NoReturn:
    if _status(msg) == _NO_RESPONDERS:
        raise nats.errors.NoRespondersError
    APIError.from_msg(msg)


async def models_bucket(
    js: JetStreamContext, bucket: str = MODELS_BUCKET, *, create: bool = False
) -> ModelBucket:
    """The models bucket; with ``create``, made (file storage, one replica) if missing.

    Without ``create`` only direct gets are used, as a car may make no other request: raises
    `ObjectMissing` if the bucket's stream does not answer them. With ``create`` (a publisher's
    permissions), a bucket made before cars read with direct gets is switched to allow them.
    """
    obs = ModelBucket(name=bucket, stream=f"OBJ_{bucket}", js=js)
    if create:
        await _create_bucket(js, bucket)
        return obs
    try:
        found = await obs.answers()
    except (TimeoutError, nats.errors.Error) as error:
        raise DownloadFailed(
            f"looking up bucket {bucket}: {type(error).__name__}: {error}"
        ) from error
    if not found:
        raise ObjectMissing(f"no object store bucket {bucket!r} (or it does not allow direct gets)")
    return obs


async def _create_bucket(js: JetStreamContext, bucket: str) -> None:
    try:
        info = await js.stream_info(f"OBJ_{bucket}")
    except NotFoundError:
        config = api.ObjectStoreConfig(
            description="idlefleet signed models", storage=api.StorageType.FILE
        )
        await js.create_object_store(bucket, config=config)  # sets allow_direct
        return
    if not info.config.allow_direct:
        await js.update_stream(dataclasses.replace(info.config, allow_direct=True))


# -- publishing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishReport:
    """What `publish_model` sent, and what the bucket already held."""

    digest: str
    model: str
    version: int
    parts_uploaded: int
    parts_skipped: int
    bytes_uploaded: int
    bytes_skipped: int


class _FileRegion(io.RawIOBase):
    """``size`` bytes of a file from ``offset``: what `ObjectStore.put` reads one part from."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), the put's owner
        self._file.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self._left]
        n = self._file.readinto(view)
        self._left -= n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


async def _object_matches(obs: ObjectStore, name: str, part: Part) -> bool:
    try:
        info = await obs.get_info(name)
    except ObjectNotFoundError:
        return False
    return info.size == part.size and info.digest == _store_digest(part.sha256)


async def publish_model(
    js: JetStreamContext,
    signed: SignedManifest,
    paths: Mapping[str, Path],
    *,
    bucket: str = MODELS_BUCKET,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PublishReport:
    """Upload the parts the bucket lacks, then the manifest, then the `latest` pointer.

    ``paths`` maps each file name in the manifest to the local file. The manifest is uploaded
    only after all its parts, so a car that can see a manifest can fetch all of it. Raises
    `DistributionError` if a local file no longer matches the manifest.
    """
    manifest = parse_payload(signed.payload)
    if set(paths) != {f.name for f in manifest.files}:
        raise DistributionError(
            f"paths name {sorted(paths)}, the manifest lists {[f.name for f in manifest.files]}"
        )
    for f in manifest.files:
        actual = Path(paths[f.name]).stat().st_size
        if actual != f.size:
            raise DistributionError(
                f"{paths[f.name]} is {actual} bytes, the manifest says {f.size}"
            )
    obs = await models_bucket(js, bucket, create=True)
    options = api.ObjectMetaOptions(max_chunk_size=chunk_bytes)
    uploaded = skipped = bytes_up = bytes_skipped = 0
    seen: set[str] = set()
    for f in manifest.files:
        offset = 0
        for part in f.parts:
            start, offset = offset, offset + part.size
            if part.sha256 in seen:
                continue
            seen.add(part.sha256)
            name = part_object_name(part.sha256)
            if await _object_matches(obs, name, part):
                skipped += 1
                bytes_skipped += part.size
                continue
            region = _FileRegion(Path(paths[f.name]), start, part.size)
            try:
                meta = api.ObjectMeta(name=name, options=options)
                info = await obs.put(name, cast(io.BufferedIOBase, region), meta=meta)
            finally:
                region.close()
            # The store hashed what it sent: a mismatch means the file changed under us.
            if info.digest != _store_digest(part.sha256) or info.size != part.size:
                await obs.delete(name)
                raise DistributionError(
                    f"{paths[f.name]} changed since its manifest was made (part at {start})"
                )
            uploaded += 1
            bytes_up += part.size
    digest = signed.digest
    meta = api.ObjectMeta(name=manifest_object_name(digest), options=options)
    await obs.put(manifest_object_name(digest), signed.to_bytes(), meta=meta)
    await obs.put(pointer_object_name(manifest.model), digest.encode("ascii"))
    return PublishReport(
        digest, manifest.model, manifest.version, uploaded, skipped, bytes_up, bytes_skipped
    )


async def latest_digest(obs: ObjectStore, model: str) -> str | None:
    """The digest the `latest` pointer names for `model`, or None if there is no pointer.

    The pointer is unsigned: whatever it names must still pass `ModelFetcher.fetch`.
    """
    name = pointer_object_name(model)
    try:
        info = await obs.get_info(name)
        # Read into memory, so its size is checked first: a pointer is 64 hex digits.
        if info.size is None or info.size > _POINTER_MAX_BYTES:
            raise MalformedManifest(f"pointer {name} is {info.size} bytes, not a digest")
        sink = io.BytesIO()
        await obs.get(name, writeinto=sink)
    except ObjectNotFoundError:
        return None
    except (TimeoutError, nats.errors.Error) as error:
        raise DownloadFailed(f"reading {name}: {type(error).__name__}: {error}") from error
    digest = sink.getvalue().decode("ascii", errors="replace").strip()
    if not _SHA256_HEX.fullmatch(digest):
        raise MalformedManifest(f"pointer for {model} holds {digest[:80]!r}, not a sha256 digest")
    return digest


# -- fetching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedModel:
    """A verified model on local disk: file name -> path of the content-addressed copy."""

    manifest: Manifest
    digest: str
    files: Mapping[str, Path]
    bytes_downloaded: int
    parts_downloaded: int


class _HashingWriter(io.RawIOBase):
    """A part's temporary file that hashes what it is given and refuses more than ``limit``."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file = file
        self._limit = limit
        self.size = 0
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(data)
        if self.size + n > self._limit:
            raise _Oversized(f"object is larger than the {self._limit} bytes the manifest lists")
        self._file.write(data)
        self.sha256.update(data)
        self.size += n
        return n


class _Oversized(Exception):
    pass


class _PartVanished(Exception):
    """Another process sharing the cache removed a part before this one assembled from it."""


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether ``path`` is there with exactly these bytes.

    A damaged copy is left in place: the fresh copy replaces it atomically, whereas deleting it
    here could delete a good copy that another process renamed over it meanwhile.
    """
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    return _sha256_of(path) == sha256


def _fsync_replace(tmp: Path, target: Path) -> None:
    # fsync before the rename: a car losing 12 V power must not find an empty file under a
    # valid name.
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


class ModelFetcher:
    """Downloads signed models from the bucket into a content-addressed cache on the car.

    ``store`` is a JetStream context (the bucket is looked up on first use) or an object store
    (a `ModelBucket`; a plain nats-py `ObjectStore` works too, but it reads through consumers,
    which a car's permissions do not allow, at a tenth of the speed).
    ``trusted`` maps key ids to the publisher keys this car accepts; ``clock`` gives unix seconds.
    The newest version accepted per model is kept in ``cache_dir/accepted.json``: once a car
    has verified version N, versions below N are refused, even if N's download did not finish.
    """

    def __init__(
        self,
        store: JetStreamContext | ObjectStore,
        cache_dir: Path,
        trusted: Mapping[str, Ed25519PublicKey],
        clock: Callable[[], float] = time.time,
        *,
        bucket: str = MODELS_BUCKET,
        part_timeout_s: float = 120.0,
        keep_parts: bool = False,
    ) -> None:
        self._store = store
        self._bucket = bucket
        self.cache_dir = Path(cache_dir)
        self._trusted = dict(trusted)
        self._clock = clock
        self._part_timeout_s = part_timeout_s
        self._keep_parts = keep_parts
        self.parts_dir = self.cache_dir / "parts"
        self.files_dir = self.cache_dir / "files"

    async def _objects(self) -> ObjectStore:
        if not isinstance(self._store, ObjectStore):
            self._store = await models_bucket(self._store, self._bucket)
        return self._store

    async def fetch_latest(self, model: str) -> FetchedModel:
        """Fetch whatever the `latest` pointer names for ``model``, verified like any digest."""
        digest = await latest_digest(await self._objects(), model)
        if digest is None:
            raise ObjectMissing(f"no {pointer_object_name(model)} pointer in {self._bucket}")
        return await self.fetch(digest, model=model)

    async def fetch(self, digest: str, model: str | None = None) -> FetchedModel:
        """Verify the manifest named ``digest`` and make all its files present and intact.

        Raises a `ManifestError` subclass if the manifest or any byte is not what a trusted key
        signed (nothing is then kept under a valid name), `ObjectMissing` if the bucket lacks an
        object, and `DownloadFailed` if the transfer broke (finished parts are kept).
        """
        if not _SHA256_HEX.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        obs = await self._objects()
        signed = SignedManifest.from_bytes(await self._read_small(obs, digest))
        if signed.digest != digest:
            raise TamperedModel(
                f"{manifest_object_name(digest)} holds a manifest whose digest is {signed.digest}",
                manifest_object_name(digest),
            )
        manifest = verify(signed, self._trusted, now=self._clock(), model=model)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._accept, manifest)
        await asyncio.to_thread(self._remove_stale_temps)

        downloaded = parts_downloaded = 0
        for _ in range(_FETCH_ROUNDS):
            missing = [
                f
                for f in manifest.files
                if not await asyncio.to_thread(_holds, self.files_dir / f.sha256, f.size, f.sha256)
            ]
            if not missing:
                break
            # Every part of every missing file is downloaded and verified before any file is
            # assembled: a tampered part anywhere leaves no new file under a valid name.
            for f, part in _unique_parts(missing):
                path = self.parts_dir / part.sha256
                if await asyncio.to_thread(_holds, path, part.size, part.sha256):
                    continue
                downloaded += await self._download_part(obs, f, part)
                parts_downloaded += 1
            try:
                for f in missing:
                    await asyncio.to_thread(self._assemble, f)
            except _PartVanished:
                continue  # another process pruned a part it had finished with: look again
        else:
            raise DownloadFailed(f"parts of {manifest.model} kept vanishing during assembly")
        if not self._keep_parts:
            await asyncio.to_thread(self._prune_parts, manifest)
        return FetchedModel(
            manifest=manifest,
            digest=digest,
            files={f.name: self.files_dir / f.sha256 for f in manifest.files},
            bytes_downloaded=downloaded,
            parts_downloaded=parts_downloaded,
        )

    def accepted(self, model: str) -> tuple[int, str] | None:
        """(version, digest) of the newest manifest accepted for ``model``, if any."""
        entry = self._read_state().get(model)
        return None if entry is None else (int(entry["version"]), str(entry["digest"]))

    # -- manifest and state ----------------------------------------------------------------------

    async def _read_small(self, obs: ObjectStore, digest: str) -> bytes:
        name = manifest_object_name(digest)
        try:
            info = await asyncio.wait_for(obs.get_info(name), self._part_timeout_s)
            # Sizes are checked before reading: the envelope is held in memory.
            if info.size is None or info.size > MAX_ENVELOPE_BYTES:
                raise MalformedManifest(f"{name} is {info.size} bytes, over {MAX_ENVELOPE_BYTES}")
            sink = io.BytesIO()
            await asyncio.wait_for(obs.get(name, writeinto=sink), self._part_timeout_s)
        except ObjectNotFoundError:
            raise ObjectMissing(f"no {name} in bucket {self._bucket}") from None
        except DigestMismatchError:
            raise TamperedModel(f"{name} does not match its object digest", name) from None
        except (TimeoutError, nats.errors.Error) as error:
            raise DownloadFailed(f"reading {name}: {type(error).__name__}: {error}") from error
        return sink.getvalue()

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        # Agent processes sharing a cache_dir must not lose each other's accepted versions.
        with open(self.cache_dir / f".{STATE_FILE}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, dict[str, Any]]:
        path = self.cache_dir / STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, ValueError) as error:
            # Fail closed: forgetting accepted versions would re-open the door to rollbacks.
            raise DistributionError(f"{path} is unreadable ({error}); remove it to reset") from None
        models = raw.get("models") if isinstance(raw, dict) else None
        if not isinstance(models, dict):
            raise DistributionError(f"{path} has no 'models' object; remove it to reset")
        return models

    def _accept(self, manifest: Manifest) -> None:
        with self._state_lock():
            state = self._read_state()
            entry = state.get(manifest.model)
            if entry is not None:
                check_rollback(manifest, int(entry["version"]), str(entry["digest"]))
            if entry is None or manifest.version > int(entry["version"]):
                state[manifest.model] = {"version": manifest.version, "digest": manifest.digest}
                data = json.dumps({"models": state}, indent=2, sort_keys=True) + "\n"
                tmp = self._temp_path(self.cache_dir, STATE_FILE)
                try:
                    tmp.write_text(data, encoding="utf-8")
                    _fsync_replace(tmp, self.cache_dir / STATE_FILE)
                finally:
                    tmp.unlink(missing_ok=True)

    # -- parts and files -------------------------------------------------------------------------

    @staticmethod
    def _temp_path(directory: Path, final_name: str) -> Path:
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=_TEMP_SUFFIX)
        os.close(fd)
        return Path(name)

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for directory in (self.cache_dir, self.parts_dir, self.files_dir):
            for tmp in directory.glob(f".*{_TEMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()

    async def _download_part(self, obs: ObjectStore, file: ManifestFile, part: Part) -> int:
        name = part_object_name(part.sha256)
        what = f"part {part.sha256[:12]}… of {file.name}"
        try:
            info = await asyncio.wait_for(obs.get_info(name), self._part_timeout_s)
        except ObjectNotFoundError:
            raise ObjectMissing(f"{what}: no {name} in bucket {self._bucket}") from None
        except (TimeoutError, nats.errors.Error) as error:
            raise DownloadFailed(f"{what}: {type(error).__name__}: {error}") from error
        # The object's metadata is not trusted either, but a wrong size or digest there is
        # reason enough to refuse without downloading anything.
        if info.size != part.size or info.digest != _store_digest(part.sha256):
            raise TamperedModel(
                f"{what}: {name} is {info.size} bytes with digest {info.digest}, not the signed "
                f"{part.size} bytes with sha256 {part.sha256}",
                file.name,
            )
        tmp = self._temp_path(self.parts_dir, part.sha256)
        try:
            with open(tmp, "wb") as out:
                sink = _HashingWriter(out, part.size)
                try:
                    await asyncio.wait_for(
                        obs.get(name, writeinto=cast(io.BufferedIOBase, sink)),
                        self._part_timeout_s,
                    )
                except (DigestMismatchError, _Oversized) as error:
                    raise TamperedModel(
                        f"{what}: {error or 'digest mismatch'}", file.name
                    ) from None
                except (TimeoutError, nats.errors.Error) as error:
                    raise DownloadFailed(f"{what}: {type(error).__name__}: {error}") from error
            actual = sink.sha256.hexdigest()
            if sink.size != part.size or actual != part.sha256:
                raise TamperedModel(
                    f"{what}: received {sink.size} bytes hashing to {actual}, the manifest signs "
                    f"{part.size} bytes with sha256 {part.sha256}",
                    file.name,
                )
            # Another process may have finished the same part first: replacing it with the same
            # bytes is harmless.
            await asyncio.to_thread(_fsync_replace, tmp, self.parts_dir / part.sha256)
        finally:
            tmp.unlink(missing_ok=True)
        return part.size

    def _assemble(self, file: ManifestFile) -> None:
        target = self.files_dir / file.sha256
        tmp = self._temp_path(self.files_dir, file.sha256)
        try:
            digest = hashlib.sha256()
            size = 0
            with open(tmp, "wb") as out:
                for part in file.parts:
                    try:
                        source = open(self.parts_dir / part.sha256, "rb")  # noqa: SIM115
                    except FileNotFoundError:
                        if _holds(target, file.size, file.sha256):
                            return  # another process assembled it and pruned the parts
                        raise _PartVanished(part.sha256) from None
                    with source:
                        while chunk := source.read(_COPY_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
            if size != file.size or digest.hexdigest() != file.sha256:
                # Parts were verified on arrival; this means one changed on disk since.
                raise TamperedModel(
                    f"{file.name}: assembled {size} bytes hashing to {digest.hexdigest()}, the "
                    f"manifest signs {file.size} bytes with sha256 {file.sha256}",
                    file.name,
                )
            _fsync_replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _prune_parts(self, manifest: Manifest) -> None:
        # The assembled files hold the same bytes; keeping the parts too would double the disk
        # a model takes on the car.
        for _, part in _unique_parts(manifest.files):
            (self.parts_dir / part.sha256).unlink(missing_ok=True)


def _unique_parts(files: Iterable[ManifestFile]) -> Iterator[tuple[ManifestFile, Part]]:
    seen: set[str] = set()
    for f in files:
        for part in f.parts:
            if part.sha256 not in seen:
                seen.add(part.sha256)
                yield f, part
