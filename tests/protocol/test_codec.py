"""Wire messages: round trips, and untrusted bytes refused with a message that says why."""

from __future__ import annotations

import numpy as np
import pytest

from idlefleet.protocol import subjects
from idlefleet.protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode, encode
from idlefleet.protocol.messages import (
    Hardware,
    Progress,
    ProgressAck,
    RegisterRequest,
    ResultChunk,
    RunReply,
    RunRequest,
    WorkGrant,
    WorkItem,
    pack,
)


def _chunk(vectors: np.ndarray, **overrides: object) -> ResultChunk:
    row = 4 * vectors.shape[1]
    fields = {
        "lease_id": "lease_1",
        "seqs": [0, 1],
        "token_counts": [5, 7],
        "sizes": [row] * len(vectors),
        "data_b64": pack(vectors.astype("<f4").tobytes()),
    }
    fields.update(overrides)
    return ResultChunk(**fields)  # type: ignore[arg-type]


def test_result_chunk_round_trips_vectors_exactly() -> None:
    vectors = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    decoded = decode(ResultChunk, encode(_chunk(vectors)))
    assert np.array_equal(np.frombuffer(decoded.data(), dtype="<f4").reshape(2, 384), vectors)
    assert decoded.seqs == [0, 1] and decoded.sizes == [4 * 384, 4 * 384]


def test_result_data_that_is_not_base64_is_refused_on_decoding() -> None:
    chunk = _chunk(np.zeros((2, 384), dtype=np.float32)).model_copy(
        update={"data_b64": "!" * len(pack(bytes(2 * 4 * 384)))}
    )
    with pytest.raises(ValueError):
        chunk.data()


def test_grant_round_trips() -> None:
    grant = WorkGrant(
        lease_id="l",
        batch_id="b",
        kind="embeddings",
        model="m",
        lease_seconds=3.0,
        items=[WorkItem(seq=4, payload=["héllo", "🚗"]), WorkItem(seq=5, payload={"k": [1, None]})],
    )
    assert decode(WorkGrant, encode(grant)) == grant


def test_online_request_and_reply_round_trip() -> None:
    request = RunRequest(request_id="r", kind="embeddings", model="m", payload=["a"])
    assert decode(RunRequest, encode(request)) == request
    reply = RunReply(token_count=3, data_b64=pack(b"\x00\x01\x02\x03"))
    assert decode(RunReply, encode(reply)).data() == b"\x00\x01\x02\x03"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{not json", "invalid ResultChunk"),
        (b"[]", "invalid ResultChunk"),
        (b'{"lease_id": "l"}', "seqs"),
    ],
)
def test_garbage_is_refused_with_a_reason(data: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode(ResultChunk, data)


def test_unknown_fields_are_refused() -> None:
    good = encode(
        RegisterRequest(
            protocol_version=1,
            agent_version="t",
            hardware=Hardware(accelerator="HW4", tops=100, memory_gb=16, power_w=100),
            models=["m"],
        )
    )
    with pytest.raises(ProtocolError, match="sudo: Extra inputs"):
        decode(RegisterRequest, good[:-1] + b', "sudo": true}')


def test_impossible_hardware_is_refused() -> None:
    data = (
        b'{"protocol_version": 1, "agent_version": "t", "models": [], '
        b'"hardware": {"accelerator": "x", "tops": -5, "memory_gb": 1, "power_w": 1}}'
    )
    with pytest.raises(ProtocolError, match="tops"):
        decode(RegisterRequest, data)


def test_result_data_must_match_declared_sizes() -> None:
    vectors = np.zeros((2, 384), dtype=np.float32)
    with pytest.raises(ValueError, match="must hold the 4608 bytes"):
        _chunk(vectors, sizes=[1536, 3072])
    with pytest.raises(ValueError, match="same length"):
        _chunk(vectors, token_counts=[1])
    with pytest.raises(ValueError, match="repeat"):
        _chunk(vectors, seqs=[1, 1])


def test_oversized_messages_are_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(ResultChunk, b" " * (MAX_MESSAGE_BYTES + 1))


def test_subjects_carry_the_vehicle_id_and_parse_back() -> None:
    subject = subjects.uplink("car-7", subjects.Uplink.RESULTS)
    assert subject == "idlefleet.v1.uplink.car-7.results"
    assert subjects.parse_uplink(subject) == ("car-7", subjects.Uplink.RESULTS)
    assert subjects.downlink("car-7", subjects.Downlink.RUN).split(".")[3] == "car-7"


@pytest.mark.parametrize("bad", ["", "car.7", "car*", "car>", "a b", "x" * 65])
def test_vehicle_ids_that_would_break_subjects_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="vehicle id"):
        subjects.uplink(bad, subjects.Uplink.WORK)


def test_foreign_subjects_do_not_parse() -> None:
    with pytest.raises(ValueError):
        subjects.parse_uplink("idlefleet.v1.uplink.car-1.rm-rf")
    with pytest.raises(ValueError):
        subjects.parse_uplink("other.v1.uplink.car-1.work")


def test_progress_round_trips_and_must_match_its_sizes() -> None:
    report = Progress(lease_id="l", seqs=[3, 7], sizes=[2, 1], data_b64=pack(b"\x00\x01\x02"))
    back = decode(Progress, encode(report))
    assert back.data() == b"\x00\x01\x02" and back.seqs == [3, 7]
    with pytest.raises(ValueError, match="must hold the 4 bytes"):
        Progress(lease_id="l", seqs=[3, 7], sizes=[2, 2], data_b64=pack(b"\x00\x01\x02"))
    with pytest.raises(ValueError, match="repeat"):
        Progress(lease_id="l", seqs=[3, 3], sizes=[2, 1], data_b64=pack(b"\x00\x01\x02"))
    assert decode(ProgressAck, encode(ProgressAck(recorded=2, lease_active=True))).recorded == 2
    item = WorkItem(seq=1, payload={"prompt": [1]}, progress_b64=pack(b"{}"))
    assert decode(WorkItem, encode(item)) == item
