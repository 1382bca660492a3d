"""Typed messages of the work protocol (version 1).

One definition per message, shared by agent and coordinator. Field docstrings are the spec.
Times on the wire are relative (seconds from now) where a deadline matters, because a car's
clock is not trusted to agree with the cloud's.

Work is workload-neutral: a grant names its workload (``kind``, e.g. ``embeddings``) and each
request's ``payload`` is a JSON value only that workload's module (``idlefleet.workloads``)
reads; results travel as bytes (base64, one blob per chunk, ``sizes`` cutting it per request)
in the workload's own encoding (embeddings: little-endian float32 rows, ~4x smaller than JSON
numbers and exact).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

PROTOCOL_VERSION = 1

_NO_NUL = r"^[^\x00]*$"
"""Text a store may keep: PostgreSQL's text holds no NUL (a heartbeat's ``reason`` with one
failed every later liveness flush, every car's with it)."""
ShortText = Annotated[str, Field(max_length=200, pattern=_NO_NUL)]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=_NO_NUL)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
"""A position, size or token count a car reports: what every store's integer columns hold (a
seq of 2**63 reached PostgreSQL's ``bigint`` and failed a whole store turn)."""


class WireModel(BaseModel):
    """Base of every wire message: unknown fields are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WireError(WireModel):
    """Why a request was refused."""

    code: Identifier
    """Machine-readable reason, e.g. ``bad_message``, ``unknown_lease``, ``not_registered``."""
    message: Annotated[str, Field(max_length=2000)]
    """Human-readable explanation."""


class Hardware(WireModel):
    """What a vehicle's inference computer can do."""

    accelerator: ShortText
    """Accelerator class, e.g. ``HW4``, ``AI5``, ``cpu``."""
    tops: Annotated[float, Field(gt=0, le=1e6)]
    """Peak INT8 tera-operations per second."""
    memory_gb: Annotated[float, Field(gt=0, le=4096)]
    """Memory available to models, GB."""
    power_w: Annotated[float, Field(gt=0, le=100_000)]
    """Power draw of the accelerator at full load, watts."""
    runtime: ShortText = "onnxruntime"
    """The inference runtime and its version, e.g. ``onnxruntime 1.23.2``."""
    provider: ShortText = "CPUExecutionProvider"
    """The runtime's execution provider the car's models run on."""
    precision: ShortText = "fp32"
    """Numeric precision of the car's model weights and compute (``fp32``, ``fp16``...).
    With the model's digest and the two above: the car's hardware class, within which two
    cars' results are compared at the tightest tolerance (verification)."""


def hardware_class(hardware: Hardware | Mapping[str, Any] | None, model_digest: str | None) -> str:
    """The hardware class of a car running a model, as a key: two cars whose keys are equal
    run the same model release (``model_digest``, a signed manifest's; None: unsigned, this
    machine's packages) on the same runtime version, execution provider and precision.
    ``hardware``: what the car registered, or its JSON as a store keeps it (a field it lacks,
    or None for all of them, counts as ``Hardware``'s default, as on the wire).

    16 hex digits of the sha256 of those four values as a JSON list: short, stable across
    processes and releases of this code, and unambiguous whatever text a car puts in the
    fields (no separator to forge). Not readable: log the ``Hardware`` beside it."""
    given = hardware.model_dump() if isinstance(hardware, Hardware) else dict(hardware or {})
    fields = [model_digest] + [
        str(given.get(name, Hardware.model_fields[name].default))
        for name in ("runtime", "provider", "precision")
    ]
    canonical = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


class RegisterRequest(WireModel):
    """A vehicle announces itself (sent on connect and after every reconnect)."""

    protocol_version: Annotated[int, Field(ge=0, le=1_000_000)]
    """Version of this protocol the agent speaks. Bounded: the refusal of another version
    quotes it, and a 4,000-digit one made that refusal fail the registrations batched with it."""
    agent_version: ShortText
    """Agent software version, for diagnostics."""
    hardware: Hardware
    """Hardware description."""
    models: Annotated[list[Identifier], Field(max_length=64)]
    """Model ids the agent can run now."""


class RegisterReply(WireModel):
    """The coordinator's answer to a registration."""

    accepted: bool
    """False if the vehicle may not take work (see ``error``)."""
    heartbeat_interval_s: float = 5.0
    """How often the agent should heartbeat."""
    policy_version: int = 0
    """Version of the owner's policy the coordinator holds (0: none yet; the car stays opted
    out). The agent fetches it on the ``policy`` subject when it differs from its own."""
    error: WireError | None = None


class CarFigures(WireModel):
    """What a car did since its last acknowledged heartbeat, for the operators' metrics
    (``/metrics``): sent only when something happened, so an idle car sends nothing."""

    runs: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    """Model runs finished or stopped."""
    compute_s: Annotated[float, Field(ge=0, le=1e7)] = 0.0
    """Seconds spent running models."""
    energy_j: Annotated[float, Field(ge=0, le=1e10)] = 0.0
    """Energy metered for those runs."""
    preemptions: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Times the car had to stop while a model ran."""
    stop_s: Annotated[list[Annotated[float, Field(ge=0, le=3600)]], Field(max_length=64)] = []
    """How long each stopped run took to stop once told (the latest 64)."""


class Heartbeat(WireModel):
    """Periodic liveness and status report."""

    seq: Annotated[int, Field(ge=0)]
    """Increasing counter, so lost heartbeats are visible."""
    status: Literal["idle", "working", "paused"]
    """What the agent is doing."""
    active_leases: Annotated[list[Identifier], Field(max_length=16)] = []
    """Leases the agent is working on."""
    reason: ShortText | None = None
    """Why the agent is paused (the policy guard's reasons), e.g. ``not_parked, not_charging``."""
    policy_version: Annotated[int, Field(ge=0)] = 0
    """Version of the owner's policy the agent is enforcing."""
    releases_refused: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Model releases this agent refused since it started (unsigned, tampered, another key's,
    expired, older than one it accepted): the cloud counts them per car."""
    figures: CarFigures | None = None
    """What the car did since its last acknowledged heartbeat (None: nothing)."""
    location: (
        tuple[Annotated[float, Field(ge=-90, le=90)], Annotated[float, Field(ge=-180, le=180)]]
        | None
    ) = None
    """``[latitude, longitude]`` from VSS ``Vehicle.CurrentLocation``, rounded by the car to
    two decimals (about a kilometre: where the car is parked, not the owner's address), for
    the operators' map; None if the car has no location reading."""


class Ack(WireModel):
    """Generic acknowledgement."""

    ok: bool = True
    policy_version: int = 0
    """For heartbeats: the coordinator's current policy version for this car."""
    error: WireError | None = None


class WorkRequest(WireModel):
    """A vehicle asks for a work unit."""

    max_requests: Annotated[int, Field(ge=1, le=10_000)]
    """Upper bound of requests the vehicle will take in this unit."""
    min_requests: Annotated[int, Field(ge=1, le=10_000)] = 1
    """The vehicle runs units of fewer requests than this below its speed (an LLM engine
    decodes this many sequences together): the coordinator leases at least this many while the
    batch has them (and never more than ``max_requests``)."""
    models: Annotated[list[Identifier], Field(min_length=1, max_length=64)]
    """Models the vehicle can run."""
    wait_s: Annotated[float, Field(ge=0, le=30)] = 0.0
    """How long the coordinator may hold the request when there is no work (long poll)."""


class WorkItem(WireModel):
    """One batch request inside a unit."""

    seq: Annotated[int, Field(ge=0)]
    """Position of the request in its batch; the unit-local key for results."""
    payload: JsonValue
    """The request's input in its workload's encoding (embeddings: the list of texts)."""
    progress_b64: str | None = None
    """Base64 of what a car that held the request before reported of its work on it (its
    workload's encoding, e.g. the tokens so far): continue from there. None: start afresh."""


class WorkGrant(WireModel):
    """The coordinator's answer to a :class:`WorkRequest`: a leased unit, or nothing."""

    lease_id: Identifier | None = None
    """Lease of the unit; None when there is no work."""
    batch_id: Identifier | None = None
    kind: Identifier | None = None
    """Workload of the unit (a key of ``idlefleet.workloads.WORKLOADS``), e.g. ``embeddings``."""
    model: Identifier | None = None
    """Model to run."""
    purpose: ShortText | None = None
    """What the customer uses the results for; the agent checks it against the owner's policy."""
    data_region: ShortText | None = None
    """Where the unit's data may be processed; checked like ``purpose``."""
    lease_seconds: float = 0.0
    """Seconds until the lease expires unless progress extends it."""
    items: list[WorkItem] = []
    retry_after_s: float = 1.0
    """When there is no work: how long to wait before asking again."""
    error: WireError | None = None
    model_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    """The signed manifest (``models.manifest``) of the model version to run, by digest: a
    car holding another version gives the unit back and fetches this one. None: any."""


def _check_blob(seqs: list[int], counts: list[list[int]], sizes: list[int], data_b64: str) -> None:
    """Per-request lists of one length, seqs unique, base64 the length ``sizes`` add up to."""
    if any(len(c) != len(seqs) for c in counts) or len(sizes) != len(seqs):
        raise ValueError("seqs, sizes and the per-request lists must have the same length")
    if len(set(seqs)) != len(seqs):
        raise ValueError("seqs must not repeat")
    expected = sum(sizes)
    # base64 length is 4 * ceil(n / 3): check before decoding anything large.
    if len(data_b64) != 4 * ((expected + 2) // 3):
        raise ValueError(f"data_b64 must hold the {expected} bytes that sizes add up to")


class ResultChunk(WireModel):
    """Finished requests of a lease (any subset, any number of times: commits are idempotent)."""

    lease_id: Identifier
    seqs: Annotated[list[Count], Field(max_length=10_000)]
    """Requests whose results are in this chunk."""
    token_counts: list[Count]
    """Tokens consumed per request (same order as ``seqs``)."""
    sizes: list[Count]
    """Bytes of each request's result in ``data_b64`` (same order as ``seqs``)."""
    data_b64: str
    """Base64 of the requests' results, concatenated in ``seqs`` order, each in its
    workload's encoding (embeddings: little-endian float32 rows)."""
    failed_seqs: Annotated[list[Count], Field(max_length=10_000)] = []
    """Requests the vehicle could not run: they return to the queue, each counting a failed
    attempt (after ``max_attempts`` a request ends in the error file, ``request_failed``)."""
    energy_j: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    """Energy the vehicle spent computing this chunk, joules (metered in the car)."""

    @model_validator(mode="after")
    def _shapes_agree(self) -> ResultChunk:
        _check_blob(self.seqs, [self.token_counts], self.sizes, self.data_b64)
        return self

    def data(self) -> bytes:
        """The decoded results (``sum(sizes)`` bytes).

        ``binascii.Error`` (a ``ValueError``) if ``data_b64`` is not strict base64.
        """
        return binascii.a2b_base64(self.data_b64, strict_mode=True)


class Progress(WireModel):
    """A car's progress on requests of its lease, while it works (any subset, any number of
    times: the newest replaces the older). It extends the lease as a result chunk does, and a
    request leased again later carries the newest progress to the next car, which continues
    from there (an LLM's tokens so far: a generation survives the car leaving)."""

    lease_id: Identifier
    seqs: Annotated[list[Count], Field(max_length=10_000)]
    sizes: list[Count]
    """Bytes of each request's progress in ``data_b64`` (same order as ``seqs``)."""
    data_b64: str
    """Base64 of the requests' progress, concatenated, in their workload's encoding."""

    @model_validator(mode="after")
    def _shapes_agree(self) -> Progress:
        _check_blob(self.seqs, [], self.sizes, self.data_b64)
        return self

    def data(self) -> bytes:
        """The decoded progress; ``binascii.Error`` (a ``ValueError``) if not strict base64."""
        return binascii.a2b_base64(self.data_b64, strict_mode=True)


class ProgressAck(WireModel):
    """The coordinator's answer to a :class:`Progress`."""

    recorded: int = 0
    """Requests whose progress was kept (those the lease still holds)."""
    lease_active: bool = False
    """If not, the car should stop working on the lease."""
    lease_seconds: float = 0.0
    """New time to expiry of the lease."""
    error: WireError | None = None


class ResultAck(WireModel):
    """The coordinator's answer to a :class:`ResultChunk`."""

    committed: int = 0
    """Results newly committed by this chunk."""
    duplicates: int = 0
    """Results that were already committed (by this or another vehicle)."""
    lease_active: bool = False
    """Whether the lease is still active; if not, the agent should drop the rest of the unit."""
    lease_seconds: float = 0.0
    """New time to expiry of the lease (progress extends it)."""
    error: WireError | None = None


class Release(WireModel):
    """A vehicle gives back the unfinished part of a lease at once."""

    lease_id: Identifier
    reason: ShortText
    """Why, e.g. ``shutdown``, ``preempted: not_parked``. A reason starting ``error`` says the
    unit failed on the car (not that the car left): each request it held counts a failed
    attempt, and one that fails on ``max_attempts`` cars ends in the error file."""
    energy_j: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    """Energy spent on this lease's work that no result chunk reported (e.g. a cancelled run)."""


class ReleaseAck(WireModel):
    released: int = 0
    """Requests returned to the queue."""
    error: WireError | None = None


class RunRequest(WireModel):
    """An online request the coordinator sends to one vehicle, to run at once. The vehicle
    answers on the request's reply subject: zero or more partial :class:`RunReply` (progress),
    then one final (the result, or an error)."""

    request_id: Identifier
    kind: Identifier
    """Workload of the request (a key of ``idlefleet.workloads.WORKLOADS``)."""
    model: Identifier
    payload: JsonValue
    """The request's input in its workload's encoding (as ``WorkItem.payload``)."""
    progress_b64: str | None = None
    """What a vehicle before this one did of the request (continue from there), as
    ``WorkItem.progress_b64``."""
    stream: bool = False
    """The client is watching: report progress after every step, not now and then."""

    def progress(self) -> bytes | None:
        """The decoded progress; ``binascii.Error`` (a ``ValueError``) if not strict base64."""
        if self.progress_b64 is None:
            return None
        return binascii.a2b_base64(self.progress_b64, strict_mode=True)


class RunReply(WireModel):
    """A vehicle's answer to a :class:`RunRequest`: partial (progress so far) or final."""

    partial: bool = False
    """Progress, not the end: more replies follow."""
    progress_b64: str = ""
    """Partial, or an error after some work: base64 of the request's progress so far, in its
    workload's encoding (as ``Progress``), for the client to see and the next car to go on."""
    token_count: Annotated[int, Field(ge=0)] = 0
    """Final: tokens the request consumed."""
    data_b64: str = ""
    """Final: base64 of the result in its workload's encoding (as one request of a
    ``ResultChunk``)."""
    energy_j: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    """Final: energy the car metered for the request (the owner's electricity on the
    ledger)."""
    error: WireError | None = None

    def data(self) -> bytes:
        """The decoded result; ``binascii.Error`` (a ``ValueError``) if not strict base64."""
        return binascii.a2b_base64(self.data_b64, strict_mode=True)

    def progress(self) -> bytes:
        """The decoded progress (empty: none); ``binascii.Error`` if not strict base64."""
        return binascii.a2b_base64(self.progress_b64, strict_mode=True)


def pack(data: bytes) -> str:
    """Encode result bytes for the wire (base64)."""
    return base64.b64encode(data).decode("ascii")
