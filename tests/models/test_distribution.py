"""Model delivery through a real nats-server's object store: publish, fetch, refuse, resume."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from idlefleet.coordinator.nats_auth import MODELS_STREAM, CloudUsers, render_authorization
from idlefleet.coordinator.store import Enrolment
from idlefleet.embedded.nats_server import NatsServer, start_nats_server
from idlefleet.models.distribution import (
    MODELS_BUCKET,
    DistributionError,
    DownloadFailed,
    FetchedModel,
    ModelBucket,
    ModelFetcher,
    ObjectMissing,
    latest_digest,
    manifest_object_name,
    models_bucket,
    part_object_name,
    pointer_object_name,
    publish_model,
)
from idlefleet.models.manifest import (
    Expired,
    MalformedManifest,
    Manifest,
    Rollback,
    SignedManifest,
    TamperedModel,
    UnknownSigner,
    UnsignedOrForged,
    WrongModel,
    key_id,
    manifest_for_files,
    public_key_bytes,
    sign,
    trusted_keys,
)
from idlefleet.protocol import subjects
from idlefleet.protocol.identity import new_nkey_seed, public_nkey

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MODEL = "all-MiniLM-L6-v2"
PART = 256 * 1024
WEIGHTS_BYTES = 5 * PART + 1000  # six parts, the last one short
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
TRUSTED = trusted_keys([KEY.public_key()])
T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    running = start_nats_server(tmp_path_factory.mktemp("nats"))
    yield running
    running.stop()


@dataclass
class Stack:
    """One test's view: the server, a bucket of its own, model files and a car's cache."""

    server: NatsServer
    bucket: str
    model_dir: Path
    cache_dir: Path
    credentials: dict[str, Any] = field(default_factory=dict)
    """How `run` connects: nothing on a server without authorization."""

    def run(self, scenario: Callable[[JetStreamContext], Awaitable[T]]) -> T:
        async def connected() -> T:
            nc = await nats.connect(self.server.url, **self.credentials)
            try:
                return await scenario(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(connected())

    def files(self, version: int = 1) -> dict[str, Path]:
        """Model files; each version changes only the last part of the weights."""
        # Distinct parts: identical ones would be stored (and counted) once.
        weights = bytearray(random.Random(0).randbytes(WEIGHTS_BYTES))
        weights[-1] = version
        folder = self.model_dir / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(bytes(weights))
        (folder / "config.json").write_bytes(b'{"hidden_size": 384, "v": %d}' % version)
        return {p.name: p for p in folder.iterdir()}

    def manifest(
        self, version: int = 1, key: Ed25519PrivateKey = KEY, ttl_s: float = 3600
    ) -> tuple[Manifest, dict[str, Path]]:
        paths = self.files(version)
        manifest = manifest_for_files(
            MODEL, version, sorted(paths.values()), time.time(), ttl_s, key_id(key), PART
        )
        return manifest, paths

    def publish(self, version: int = 1, key: Ed25519PrivateKey = KEY) -> SignedManifest:
        manifest, paths = self.manifest(version, key)
        signed = sign(manifest, key)
        self.run(lambda js: publish_model(js, signed, paths, bucket=self.bucket))
        return signed

    def fetcher(self, js: JetStreamContext | ObjectStore, **options: Any) -> ModelFetcher:
        options.setdefault("bucket", self.bucket)
        return ModelFetcher(js, self.cache_dir, TRUSTED, **options)

    def fetch(self, digest: str, **options: Any) -> FetchedModel:
        return self.run(lambda js: self.fetcher(js, **options).fetch(digest))

    def held_files(self) -> list[str]:
        files = self.cache_dir / "files"
        return sorted(p.name for p in files.iterdir()) if files.exists() else []

    def temp_files(self) -> list[Path]:
        return [p for p in self.cache_dir.rglob(".*") if p.name.endswith(".partial")]


@pytest.fixture
def stack(server: NatsServer, tmp_path: Path) -> Stack:
    # A bucket per test: tests share one server but never each other's objects.
    return Stack(server, f"models-{uuid.uuid4().hex[:12]}", tmp_path / "src", tmp_path / "car")


async def put_object(js: JetStreamContext, bucket: str, name: str, data: bytes) -> None:
    obs = await models_bucket(js, bucket)
    await obs.put(name, data)


async def get_object(js: JetStreamContext, bucket: str, name: str) -> bytes:
    sink = io.BytesIO()
    await (await models_bucket(js, bucket)).get(name, writeinto=sink)
    return sink.getvalue()


def bucket_args(js: JetStreamContext, bucket: str) -> dict[str, Any]:
    return {"name": bucket, "stream": f"OBJ_{bucket}", "js": js}


async def latest_digest_of(js: JetStreamContext, bucket: str) -> str | None:
    return await latest_digest(await models_bucket(js, bucket), MODEL)


class FlakyStore(ModelBucket):
    """The bucket, but the connection "drops" after ``parts_before_failure`` part downloads."""

    def __init__(self, js: JetStreamContext, bucket: str, parts_before_failure: int) -> None:
        super().__init__(**bucket_args(js, bucket))
        self.parts_left = parts_before_failure

    async def get(self, name: str, *args: Any, **kwargs: Any) -> ObjectStore.ObjectResult:
        if name.startswith("part."):
            if self.parts_left == 0:
                raise nats.errors.ConnectionClosedError
            self.parts_left -= 1
        return await super().get(name, *args, **kwargs)


class SwappingStore(ModelBucket):
    """Serves honest metadata for one part but another object's bytes: a lying server."""

    def __init__(self, js: JetStreamContext, bucket: str, part_name: str, served: str) -> None:
        super().__init__(**bucket_args(js, bucket))
        self.part_name, self.served = part_name, served

    async def get(self, name: str, *args: Any, **kwargs: Any) -> ObjectStore.ObjectResult:
        return await super().get(self.served if name == self.part_name else name, *args, **kwargs)


# -- delivery --------------------------------------------------------------------------------


def test_a_published_model_arrives_intact_and_a_second_fetch_moves_nothing(stack: Stack) -> None:
    signed = stack.publish()
    sources = stack.files()

    first = stack.fetch(signed.digest)
    second = stack.fetch(signed.digest)

    total = sum(p.stat().st_size for p in sources.values())
    assert first.bytes_downloaded == total and first.parts_downloaded == 7
    assert (second.bytes_downloaded, second.parts_downloaded) == (0, 0)
    for name, path in first.files.items():
        assert path.read_bytes() == sources[name].read_bytes()
        assert path.name == hashlib.sha256(sources[name].read_bytes()).hexdigest()
    assert first.manifest.model == MODEL and first.digest == signed.digest
    assert list((stack.cache_dir / "parts").iterdir()) == []  # pruned once files are whole
    assert stack.temp_files() == []


def test_publishing_again_uploads_only_the_parts_the_bucket_lacks(stack: Stack) -> None:
    stack.publish(1)
    manifest, paths = stack.manifest(2)
    signed = sign(manifest, KEY)

    again = stack.run(lambda js: publish_model(js, signed, paths, bucket=stack.bucket))

    # v2 changes the weights' last part and the config: the first five parts are in the bucket.
    assert (again.parts_uploaded, again.parts_skipped) == (2, 5)
    assert again.bytes_skipped == 5 * PART
    pointer = stack.run(lambda js: get_object(js, stack.bucket, pointer_object_name(MODEL)))
    assert pointer.decode() == signed.digest


def test_fetch_latest_follows_the_pointer(stack: Stack) -> None:
    stack.publish(1)
    newest = stack.publish(2)

    fetched = stack.run(lambda js: stack.fetcher(js).fetch_latest(MODEL))

    assert fetched.digest == newest.digest and fetched.manifest.version == 2


def test_publish_refuses_paths_that_do_not_match_the_manifest(stack: Stack) -> None:
    manifest, paths = stack.manifest()
    signed = sign(manifest, KEY)
    paths["model.safetensors"].write_bytes(b"shorter")

    with pytest.raises(DistributionError, match="manifest says"):
        stack.run(lambda js: publish_model(js, signed, paths, bucket=stack.bucket))
    with pytest.raises(DistributionError, match="lists"):
        stack.run(lambda js: publish_model(js, signed, {}, bucket=stack.bucket))


# -- refusals --------------------------------------------------------------------------------


def test_a_part_with_one_flipped_byte_is_refused_and_nothing_is_assembled(stack: Stack) -> None:
    signed = stack.publish()
    weights = stack.manifest()[0].files[1]
    assert weights.name == "model.safetensors"
    name = part_object_name(weights.parts[3].sha256)
    data = bytearray(stack.run(lambda js: get_object(js, stack.bucket, name)))
    data[100] ^= 0x01
    stack.run(lambda js: put_object(js, stack.bucket, name, bytes(data)))

    with pytest.raises(TamperedModel, match=r"model\.safetensors") as caught:
        stack.fetch(signed.digest)

    assert caught.value.file_name == "model.safetensors"
    assert stack.held_files() == []
    assert weights.parts[3].sha256 not in os.listdir(stack.cache_dir / "parts")
    assert stack.temp_files() == []


def test_bytes_that_contradict_honest_metadata_are_refused(stack: Stack) -> None:
    # The server's metadata passes the pre-check; the bytes it then sends do not hash right.
    signed = stack.publish()
    weights = stack.manifest()[0].files[1]
    real_name = part_object_name(weights.parts[0].sha256)
    stack.run(lambda js: put_object(js, stack.bucket, "evil", os.urandom(PART)))

    async def scenario(js: JetStreamContext) -> FetchedModel:
        lying = SwappingStore(js, stack.bucket, real_name, "evil")
        return await stack.fetcher(lying).fetch(signed.digest)

    with pytest.raises(TamperedModel, match="hashing to"):
        stack.run(scenario)
    assert stack.held_files() == [] and stack.temp_files() == []


def test_a_manifest_signed_by_another_key_is_refused_before_any_download(stack: Stack) -> None:
    theirs = stack.publish(key=OTHER_KEY)

    with pytest.raises(UnknownSigner):
        stack.fetch(theirs.digest)

    assert stack.held_files() == [] and not (stack.cache_dir / "parts").exists()


def test_an_unsigned_manifest_is_refused(stack: Stack) -> None:
    signed = stack.publish()
    unsigned = SignedManifest(signed.payload, b"")
    stack.run(
        lambda js: put_object(
            js, stack.bucket, manifest_object_name(signed.digest), unsigned.to_bytes()
        )
    )

    with pytest.raises(UnsignedOrForged):
        stack.fetch(signed.digest)
    assert stack.held_files() == []


def test_an_expired_manifest_is_refused(stack: Stack) -> None:
    signed = stack.publish()

    with pytest.raises(Expired):
        stack.fetch(signed.digest, clock=lambda: time.time() + 7200)
    assert stack.held_files() == []


def test_a_manifest_for_another_model_is_refused(stack: Stack) -> None:
    signed = stack.publish()

    with pytest.raises(WrongModel):
        stack.run(lambda js: stack.fetcher(js).fetch(signed.digest, model="SmolLM2-135M-Instruct"))


def test_a_manifest_object_that_is_not_the_digest_asked_for_is_refused(stack: Stack) -> None:
    v1, v2 = stack.publish(1), stack.publish(2)
    stack.run(
        lambda js: put_object(js, stack.bucket, manifest_object_name(v2.digest), v1.to_bytes())
    )

    with pytest.raises(TamperedModel, match="digest"):
        stack.fetch(v2.digest)


def test_an_older_version_is_refused_after_a_newer_one_even_through_the_pointer(
    stack: Stack,
) -> None:
    v1, v2 = stack.publish(1), stack.publish(2)
    stack.fetch(v2.digest)
    stack.run(
        lambda js: put_object(js, stack.bucket, pointer_object_name(MODEL), v1.digest.encode())
    )

    with pytest.raises(Rollback):
        stack.fetch(v1.digest)
    with pytest.raises(Rollback):  # a fresh fetcher on the same cache remembers
        stack.run(lambda js: stack.fetcher(js).fetch_latest(MODEL))


def test_missing_objects_are_reported_as_missing(stack: Stack) -> None:
    stack.publish()

    with pytest.raises(ObjectMissing, match="manifest"):
        stack.fetch("0" * 64)
    with pytest.raises(ObjectMissing, match="latest"):
        stack.run(lambda js: stack.fetcher(js).fetch_latest("SmolLM2-135M-Instruct"))


# -- resuming and sharing --------------------------------------------------------------------


def test_an_interrupted_download_resumes_from_its_finished_parts(stack: Stack) -> None:
    signed = stack.publish()
    total = sum(p.stat().st_size for p in stack.files().values())

    async def interrupted(js: JetStreamContext) -> FetchedModel:
        flaky = FlakyStore(js, stack.bucket, parts_before_failure=3)
        return await stack.fetcher(flaky).fetch(signed.digest)

    with pytest.raises(DownloadFailed, match="ConnectionClosedError"):
        stack.run(interrupted)
    kept = {p.name: p.stat().st_size for p in (stack.cache_dir / "parts").iterdir()}
    assert len(kept) == 3 and stack.held_files() == [] and stack.temp_files() == []

    resumed = stack.fetch(signed.digest)

    assert resumed.bytes_downloaded == total - sum(kept.values())
    assert resumed.parts_downloaded == 7 - 3


def test_a_lost_or_damaged_cached_part_is_downloaded_again(stack: Stack) -> None:
    signed = stack.publish()

    async def interrupted(js: JetStreamContext) -> FetchedModel:
        flaky = FlakyStore(js, stack.bucket, parts_before_failure=3)
        return await stack.fetcher(flaky).fetch(signed.digest)

    with pytest.raises(DownloadFailed):
        stack.run(interrupted)
    lost, damaged, intact = sorted((stack.cache_dir / "parts").iterdir())
    intact_size = intact.stat().st_size
    lost.unlink()
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])

    resumed = stack.fetch(signed.digest)

    assert resumed.parts_downloaded == 7 - 1  # only the intact part was reused
    assert resumed.bytes_downloaded == resumed.manifest.total_bytes - intact_size


def test_a_damaged_cached_file_is_replaced_by_a_fresh_copy(stack: Stack) -> None:
    signed = stack.publish()
    fetched = stack.fetch(signed.digest)
    weights = fetched.files["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    again = stack.fetch(signed.digest)

    assert again.bytes_downloaded == WEIGHTS_BYTES
    assert weights.read_bytes() == stack.files()["model.safetensors"].read_bytes()


def test_two_fetchers_sharing_one_cache_both_get_the_model(stack: Stack) -> None:
    # The embedded fleet's agents share a cache_dir: parts may be finished, or pruned, by the
    # other one at any moment.
    signed = stack.publish()

    async def both(js: JetStreamContext) -> list[FetchedModel]:
        return list(
            await asyncio.gather(
                stack.fetcher(js).fetch(signed.digest), stack.fetcher(js).fetch(signed.digest)
            )
        )

    results = stack.run(both)

    sources = stack.files()
    for fetched in results:
        for name, path in fetched.files.items():
            assert path.read_bytes() == sources[name].read_bytes()
    assert stack.temp_files() == []


class InterleavingStore(ModelBucket):
    """Before serving the last part, lets ``other`` fetch the whole model into the same cache."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        last_part: str,
        other: Callable[[], Awaitable[Any]],
    ) -> None:
        super().__init__(**bucket_args(js, bucket))
        self.last_part, self.other = last_part, other

    async def get(self, name: str, *args: Any, **kwargs: Any) -> ObjectStore.ObjectResult:
        if name == self.last_part:
            await self.other()
        return await super().get(name, *args, **kwargs)


def test_a_fetcher_whose_parts_another_process_pruned_still_finishes(stack: Stack) -> None:
    signed = stack.publish()
    weights = stack.manifest()[0].files[1]

    async def scenario(js: JetStreamContext) -> tuple[FetchedModel, FetchedModel]:
        real = await models_bucket(js, stack.bucket)
        other_result: list[FetchedModel] = []

        async def other() -> None:
            other_result.append(await stack.fetcher(real).fetch(signed.digest))

        last = part_object_name(weights.parts[-1].sha256)
        slow = InterleavingStore(js, stack.bucket, last, other)
        return await stack.fetcher(slow).fetch(signed.digest), other_result[0]

    mine, theirs = stack.run(scenario)

    assert mine.files == theirs.files
    assert theirs.bytes_downloaded == WEIGHTS_BYTES - sum(p.size for p in weights.parts[:-1])
    sources = stack.files()
    assert all(p.read_bytes() == sources[n].read_bytes() for n, p in mine.files.items())
    assert list((stack.cache_dir / "parts").iterdir()) == [] and stack.temp_files() == []


def test_identical_parts_are_stored_and_downloaded_once(stack: Stack) -> None:
    block = random.Random(1).randbytes(PART)
    path = stack.model_dir / "repeated.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(block * 4)
    manifest = manifest_for_files(MODEL, 1, [path], time.time(), 60, key_id(KEY), PART)
    signed = sign(manifest, KEY)

    report = stack.run(lambda js: publish_model(js, signed, {path.name: path}, bucket=stack.bucket))
    fetched = stack.fetch(signed.digest)

    assert (report.parts_uploaded, report.bytes_uploaded) == (1, PART)
    assert (fetched.parts_downloaded, fetched.bytes_downloaded) == (1, PART)
    assert fetched.files[path.name].read_bytes() == block * 4


def test_temporary_files_left_by_a_killed_process_are_removed_once_stale(stack: Stack) -> None:
    signed = stack.publish()
    parts = stack.cache_dir / "parts"
    parts.mkdir(parents=True)
    stale, fresh = parts / ".abc.x.partial", parts / ".abc.y.partial"
    stale.write_bytes(b"half a part")
    fresh.write_bytes(b"another process is writing this")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    stack.fetch(signed.digest)

    assert not stale.exists() and fresh.exists()


def test_the_model_bucket_reads_objects_whole_into_memory_or_a_file(stack: Stack) -> None:
    data = random.Random(2).randbytes(3 * 1024 * 1024 + 5)

    async def scenario(js: JetStreamContext) -> tuple[bytes, bytes, bytes]:
        obs = await models_bucket(js, stack.bucket, create=True)
        meta = api.ObjectMeta(name="x", options=api.ObjectMetaOptions(max_chunk_size=64 * 1024))
        await obs.put("x", data, meta=meta)
        await obs.put("empty", b"")
        in_memory = (await obs.get("x")).data or b""
        sink = io.BytesIO()
        await obs.get("x", writeinto=sink)
        empty = (await obs.get("empty")).data or b""
        return in_memory, sink.getvalue(), empty

    in_memory, in_file, empty = stack.run(scenario)

    assert in_memory == data and in_file == data and empty == b""


def test_a_plain_nats_py_object_store_works_too(stack: Stack) -> None:
    signed = stack.publish()

    async def scenario(js: JetStreamContext) -> FetchedModel:
        return await stack.fetcher(await js.object_store(stack.bucket)).fetch(signed.digest)

    assert stack.run(scenario).bytes_downloaded == signed_total(stack)


def signed_total(stack: Stack) -> int:
    return sum(p.stat().st_size for p in stack.files().values())


def test_a_car_never_creates_the_bucket(stack: Stack) -> None:
    with pytest.raises(ObjectMissing, match="bucket"):
        stack.fetch("0" * 64)

    async def buckets(js: JetStreamContext) -> list[str]:
        return [s.config.name or "" for s in await js.streams_info()]

    assert f"OBJ_{stack.bucket}" not in stack.run(buckets)


@pytest.mark.parametrize("pointer", [b"x" * 4096, b"not a digest"], ids=["huge", "garbage"])
def test_a_pointer_that_is_not_a_digest_is_refused(stack: Stack, pointer: bytes) -> None:
    stack.publish()
    stack.run(lambda js: put_object(js, stack.bucket, pointer_object_name(MODEL), pointer))

    with pytest.raises(MalformedManifest, match="pointer"):
        stack.run(lambda js: stack.fetcher(js).fetch_latest(MODEL))


KILLED_CAR = """
import asyncio, sys
from pathlib import Path
import nats
from idlefleet.models.distribution import ModelBucket, ModelFetcher
from idlefleet.models.manifest import load_public_key, trusted_keys

url, bucket, cache_dir, digest, public_hex = sys.argv[1:]

class Hangs(ModelBucket):
    parts_left = 3
    async def get(self, name, *args, **kwargs):
        if name.startswith("part."):
            if self.parts_left == 0:
                print("hanging", flush=True)
                await asyncio.Event().wait()
            self.parts_left -= 1
        return await super().get(name, *args, **kwargs)

async def main():
    nc = await nats.connect(url)
    store = Hangs(name=bucket, stream=f"OBJ_{bucket}", js=nc.jetstream())
    trusted = trusted_keys([load_public_key(bytes.fromhex(public_hex))])
    await ModelFetcher(store, Path(cache_dir), trusted, bucket=bucket).fetch(digest)

asyncio.run(main())
"""


def test_a_fetch_killed_midway_resumes_in_the_next_process(stack: Stack) -> None:
    signed = stack.publish()
    args = [stack.server.url, stack.bucket, str(stack.cache_dir), signed.digest]
    command = [sys.executable, "-c", KILLED_CAR, *args, public_key_bytes(KEY).hex()]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as car:
        try:
            assert car.stdout is not None and car.stdout.readline() == "hanging\n"
        finally:
            car.kill()  # SIGKILL: no cleanup of any kind runs
    parts = (stack.cache_dir / "parts").iterdir()
    kept = {p.name: p.stat().st_size for p in parts if not p.name.startswith(".")}
    assert len(kept) == 3 and len(stack.temp_files()) == 1  # the part it was on

    resumed = stack.fetch(signed.digest)

    assert resumed.bytes_downloaded == resumed.manifest.total_bytes - sum(kept.values())
    assert resumed.files["model.safetensors"].read_bytes() == (
        stack.files()["model.safetensors"].read_bytes()
    )


# -- the direct-get reader -------------------------------------------------------------------


def test_chunks_are_read_in_batches_and_found_among_another_objects(stack: Stack) -> None:
    # Chunks of two objects alternate in the stream, and each batch holds two chunks: every
    # batch after the first starts past the other object's chunks.
    chunk = 64 * 1024
    data = {nuid: random.Random(nuid).randbytes(5 * chunk + 7) for nuid in ("Aa", "Bb")}

    async def scenario(js: JetStreamContext) -> dict[str, bytes]:
        obs = await models_bucket(js, stack.bucket, create=True)
        for offset in range(0, 5 * chunk + 7, chunk):
            for nuid, content in data.items():
                await js.publish(f"$O.{stack.bucket}.C.{nuid}", content[offset : offset + chunk])
        for nuid, content in data.items():
            meta = {
                "name": nuid,
                "bucket": stack.bucket,
                "nuid": nuid,
                "size": len(content),
                "chunks": 6,
                "digest": "SHA-256="
                + base64.urlsafe_b64encode(hashlib.sha256(content).digest()).decode(),
            }
            subject = f"$O.{stack.bucket}.M.{base64.urlsafe_b64encode(nuid.encode()).decode()}"
            await js.publish(subject, json.dumps(meta).encode())
        small_batches = ModelBucket(**bucket_args(js, stack.bucket), batch_bytes=2 * chunk)
        assert await obs.answers()
        return {nuid: (await small_batches.get(nuid)).data or b"" for nuid in data}

    assert stack.run(scenario) == data


def test_a_bucket_without_direct_gets_is_missing_to_a_car_until_the_publisher_enables_them(
    stack: Stack,
) -> None:
    signed = stack.publish()

    async def scenario(js: JetStreamContext) -> str | None:
        info = await js.stream_info(f"OBJ_{stack.bucket}")
        await js.update_stream(dataclasses.replace(info.config, allow_direct=False))
        with pytest.raises(ObjectMissing, match="direct gets"):
            await models_bucket(js, stack.bucket)
        await models_bucket(js, stack.bucket, create=True)
        return await latest_digest_of(js, stack.bucket)

    assert stack.run(scenario) == signed.digest


# -- with the fleet's NATS permissions -------------------------------------------------------

CAR = "car-007"


@dataclass
class Secured:
    """A nats-server with the fleet's accounts: a publisher, a coordinator, one enrolled car."""

    server: NatsServer
    publisher_seed: str
    car_seed: str

    def stack(self, folder: Path) -> Stack:
        """Publishes as the model publisher (the MODELS account), into the bucket the car's
        permissions name."""
        credentials = {"nkeys_seed_str": self.publisher_seed}
        return Stack(self.server, MODELS_BUCKET, folder / "src", folder / "car", credentials)

    async def connect_car(self, errors: list[str]) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        return await nats.connect(
            self.server.url,
            nkeys_seed_str=self.car_seed,
            inbox_prefix=subjects.inbox_prefix(CAR),
            error_cb=on_error,
        )


def start_secured(folder: Path) -> Secured:
    cloud_seed, publisher_seed, car_seed = new_nkey_seed(), new_nkey_seed(), new_nkey_seed()
    car = Enrolment(CAR, public_nkey(car_seed), "owner", time.time())
    folder.mkdir(parents=True, exist_ok=True)
    auth = folder / "authorization.conf"
    cloud = CloudUsers(public_nkey(cloud_seed), public_nkey(publisher_seed))
    auth.write_text(render_authorization(cloud, [car]))
    return Secured(start_nats_server(folder / "nats", auth_file=auth), publisher_seed, car_seed)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    running = start_secured(tmp_path_factory.mktemp("secured"))
    yield running
    running.server.stop()


def test_a_car_fetches_a_model_with_its_permissions(secured: Secured, tmp_path: Path) -> None:
    stack = secured.stack(tmp_path)
    signed = stack.publish()
    errors: list[str] = []

    async def as_car() -> FetchedModel:
        nc = await secured.connect_car(errors)
        try:
            return await stack.fetcher(nc.jetstream()).fetch_latest(MODEL)
        finally:
            await nc.close()

    fetched = asyncio.run(as_car())

    assert fetched.digest == signed.digest and fetched.parts_downloaded == 7
    sources = stack.files()
    assert all(p.read_bytes() == sources[n].read_bytes() for n, p in fetched.files.items())
    assert errors == []  # not one request that its permissions refuse


def test_a_car_cannot_create_a_consumer_purge_the_bucket_or_put_an_object(
    secured: Secured, tmp_path: Path
) -> None:
    stack = secured.stack(tmp_path)
    signed = stack.publish()
    before = stack.run(lambda js: js.stream_info(MODELS_STREAM))
    # A push consumer delivering the stream onto another car's uplink.
    elsewhere = subjects.uplink("car-008", subjects.Uplink.RESULTS)
    config = {"durable_name": "evil", "deliver_subject": elsewhere, "ack_policy": "none"}
    consumer = json.dumps({"stream_name": MODELS_STREAM, "config": config}).encode()
    refused = {
        f"$JS.API.CONSUMER.CREATE.{MODELS_STREAM}": consumer,
        f"$JS.API.CONSUMER.CREATE.{MODELS_STREAM}.evil": consumer,
        f"$JS.API.CONSUMER.DURABLE.CREATE.{MODELS_STREAM}.evil": consumer,
        f"$JS.API.STREAM.PURGE.{MODELS_STREAM}": b"",
    }
    errors: list[str] = []

    async def as_car() -> None:
        nc = await secured.connect_car(errors)
        try:
            for subject, body in refused.items():
                with pytest.raises(nats.errors.TimeoutError):  # the server drops it
                    await nc.request(subject, body, timeout=0.5)
            bucket = await models_bucket(nc.jetstream(timeout=0.5))
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await bucket.put(pointer_object_name(MODEL), b"0" * 64)
        finally:
            await nc.close()

    asyncio.run(as_car())

    for subject in refused:
        assert any("permissions violation" in e and subject.lower() in e for e in errors)
    assert any("permissions violation" in e and "$o.idlefleet-models.c." in e for e in errors)
    after = stack.run(lambda js: js.stream_info(MODELS_STREAM))
    assert after.state.consumer_count == 0
    assert after.state.messages == before.state.messages
    assert stack.run(lambda js: latest_digest_of(js, MODELS_BUCKET)) == signed.digest


def test_a_direct_get_answer_aimed_at_the_jetstream_api_leaves_the_bucket_alone(
    tmp_path: Path,
) -> None:
    # nats-server checks no client's reply subject, and JetStream answers a direct get on it:
    # in the account of the stream, an empty "not found" answer aimed at the JetStream API is
    # a stream delete request. The stream lives in MODELS; the car's answer comes back in
    # FLEET, where no JetStream listens.
    own = start_secured(tmp_path / "own")  # this test may lose its bucket
    try:
        stack = own.stack(tmp_path)
        signed = stack.publish()

        async def as_car() -> None:
            nc = await own.connect_car([])
            try:
                await nc.publish(
                    f"$JS.API.DIRECT.GET.{MODELS_STREAM}",
                    b'{"seq": 1000000}',  # a sequence the stream does not hold
                    reply=f"$JS.API.STREAM.DELETE.{MODELS_STREAM}",
                )
                await nc.flush()
            finally:
                await nc.close()

        asyncio.run(as_car())

        async def streams(js: JetStreamContext) -> list[str]:
            return [s.config.name or "" for s in await js.streams_info()]

        # Nothing to wait for if the bucket stays: a bounded look, not a sleep before one.
        deadline = time.monotonic() + 2
        while MODELS_STREAM in stack.run(streams) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert MODELS_STREAM in stack.run(streams)
        assert stack.run(lambda js: latest_digest_of(js, MODELS_BUCKET)) == signed.digest
    finally:
        own.server.stop()
