"""The owner API (policy, consent) and the consent extensions of the fleet and batch APIs,
over real HTTP against the real app (see ``live.py``). Requests go as alice, the owner of
each test's car, unless a test says otherwise; who may call what is ``test_access_api.py``."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.protocol.messages import (
    Hardware,
    Heartbeat,
    RegisterRequest,
    Release,
    ResultChunk,
    WorkRequest,
    pack,
)
from idlefleet.protocol.policy import DATA_REGIONS, PURPOSES, OwnerPolicy
from tests.coordinator.api.live import LiveCoordinator, live_coordinator

MODEL = "all-MiniLM-L6-v2"
_ids = itertools.count()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("owner-api")) as running:
        yield running


@pytest.fixture
def car(live: LiveCoordinator) -> str:
    """A fresh vehicle id per test (the server is shared by the module), enrolled under alice."""
    live.pushes.clear()
    live.push_answer = True
    vehicle_id = f"car-{next(_ids)}"
    live.enrol(vehicle_id)
    return vehicle_id


def full_policy(**changes: Any) -> dict[str, Any]:
    return OwnerPolicy(**changes).model_dump(mode="json")


def register(live: LiveCoordinator, vehicle_id: str) -> None:
    hardware = Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=10)
    request = RegisterRequest(
        protocol_version=1, agent_version="t", hardware=hardware, models=[MODEL]
    )
    assert live.work.register(vehicle_id, request).accepted


# -- policy ------------------------------------------------------------------------------------


def test_a_car_without_a_policy_shows_version_0_and_the_cautious_defaults(
    live: LiveCoordinator, car: str
) -> None:
    status, body = live.call("GET", f"/fleet/vehicles/{car}/policy")

    assert status == 200
    assert body == {
        "vehicle_id": car,
        "version": 0,
        "policy": full_policy(),
        "updated_at": None,
        "actor": None,
    }
    assert body["policy"]["opted_in"] is False


def test_put_policy_appends_a_version_and_pushes_it_to_the_car(
    live: LiveCoordinator, car: str
) -> None:
    policy = full_policy(opted_in=True, soc_floor_percent=70, timezone="Europe/Berlin")

    status, put = live.call("PUT", f"/fleet/vehicles/{car}/policy", {"policy": policy})
    _, got = live.call("GET", f"/fleet/vehicles/{car}/policy")

    assert status == 200
    assert (put["version"], put["policy"], put["actor"]) == (1, policy, "owner:alice")
    assert put["pushed_to_vehicle"] is True
    assert isinstance(put["updated_at"], float)
    assert got == {k: v for k, v in put.items() if k != "pushed_to_vehicle"}
    assert [(vid, u.version, u.policy.model_dump(mode="json")) for vid, u in live.pushes] == [
        (car, 1, policy)
    ]


def test_consent_replaces_only_its_fields_and_keeps_the_rest_of_the_policy(
    live: LiveCoordinator, car: str
) -> None:
    live.call("PUT", f"/fleet/vehicles/{car}/policy", {"policy": full_policy(soc_floor_percent=80)})

    status, body = live.call(
        "POST",
        f"/fleet/vehicles/{car}/consent",
        {"opted_in": True, "purposes": ["research"]},
        key="operator",
    )

    assert status == 200
    assert body["version"] == 2 and body["actor"] == "operator:ops"
    policy = body["policy"]
    assert (policy["opted_in"], policy["purposes"], policy["soc_floor_percent"]) == (
        True,
        ["research"],
        80,
    )
    assert policy["data_regions"] == list(DATA_REGIONS)
    assert [u.version for _, u in live.pushes] == [1, 2]


def test_the_consent_record_lists_every_version_oldest_first(
    live: LiveCoordinator, car: str
) -> None:
    live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True})
    live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True, "data_regions": ["eu"]})
    live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": False}, key="operator")

    status, body = live.call("GET", f"/fleet/vehicles/{car}/consent")
    _, latest = live.call("GET", f"/fleet/vehicles/{car}/consent?limit=1")

    assert status == 200 and body["object"] == "list"
    rows = [(r["version"], r["opted_in"], r["data_regions"], r["actor"]) for r in body["data"]]
    assert rows == [
        (1, True, list(DATA_REGIONS), "owner:alice"),
        (2, True, ["eu"], "owner:alice"),
        (3, False, ["eu"], "operator:ops"),
    ]
    assert all(r["purposes"] == list(PURPOSES) for r in body["data"])
    times = [r["created_at"] for r in body["data"]]
    assert times == sorted(times)
    assert [r["version"] for r in latest["data"]] == [3]


def test_a_car_that_does_not_take_the_push_does_not_fail_the_change(
    live: LiveCoordinator, car: str
) -> None:
    live.push_answer = ConnectionError("NATS is down")

    status, body = live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True})

    assert status == 200
    assert body["pushed_to_vehicle"] is False
    assert live.call("GET", f"/fleet/vehicles/{car}/policy")[1]["version"] == 1


# -- refusals ----------------------------------------------------------------------------------


def _put(policy_changes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"policy": full_policy() | policy_changes} | top


BAD_PUTS: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("malformed-json", b'{"policy": ', "Invalid JSON"),
    ("not-an-object", b"[1, 2]", "Input should be an object"),
    ("unknown-top-field", _put({}, colour="red"), "colour: Extra inputs are not permitted"),
    (
        "unknown-policy-field",
        _put({"turbo": True}),
        "policy.turbo: Extra inputs are not permitted",
    ),
    (
        "soc-140",
        _put({"soc_floor_percent": 140}),
        "policy.soc_floor_percent: Input should be less than or equal to 100",
    ),
    (
        "negative-cap",
        _put({"daily_energy_cap_kwh": -1}),
        "policy.daily_energy_cap_kwh: Input should be greater than or equal to 0",
    ),
    ("unknown-purpose", _put({"purposes": ["mining"]}), "policy.purposes.0: Input should be"),
    ("unknown-region", _put({"data_regions": ["mars"]}), "policy.data_regions.0: Input should"),
    ("bad-timezone", _put({"timezone": "Mars/Olympus"}), "policy.timezone: Value error, unknown"),
    ("bad-hours", _put({"allowed_hours": ["25:00-07:00"]}), "policy.allowed_hours"),
    # Who made a change is the caller's key: a body that names someone is refused, not obeyed.
    ("actor-in-body", _put({}, actor="owner:bob"), "actor: Extra inputs are not permitted"),
    ("no-policy", {}, "policy: Field required"),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [b[1:] for b in BAD_PUTS], ids=[b[0] for b in BAD_PUTS]
)
def test_a_bad_policy_is_refused_with_400_naming_field_and_problem(
    live: LiveCoordinator, car: str, body: bytes | dict[str, Any], fragment: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    status, error = live.call(
        "PUT", f"/fleet/vehicles/{car}/policy", None if raw else body, raw=raw
    )

    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]
    assert live.call("GET", f"/fleet/vehicles/{car}/consent")[1]["data"] == []
    assert live.pushes == []


BAD_CONSENTS: list[tuple[str, dict[str, Any], str]] = [
    ("opted-in-as-text", {"opted_in": "yes"}, "opted_in: Input should be a valid"),
    ("opted-in-as-number", {"opted_in": 1}, "opted_in: Input should be a valid"),
    ("no-opted-in", {}, "opted_in: Field required"),
    ("unknown-purpose", {"opted_in": True, "purposes": ["x"]}, "purposes.0"),
    ("empty-purposes", {"opted_in": True, "purposes": []}, "purposes: List should"),
    ("repeated-region", {"opted_in": True, "data_regions": ["eu", "eu"]}, "repeat"),
    ("actor-in-body", {"opted_in": True, "actor": "owner:bob"}, "actor: Extra inputs are not"),
    ("extra", {"opted_in": True, "soc": 3}, "soc: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(
    ("body", "fragment"), [b[1:] for b in BAD_CONSENTS], ids=[b[0] for b in BAD_CONSENTS]
)
def test_a_bad_consent_is_refused_with_400_and_records_nothing(
    live: LiveCoordinator, car: str, body: dict[str, Any], fragment: str
) -> None:
    status, error = live.call("POST", f"/fleet/vehicles/{car}/consent", body)

    assert status == 400
    assert fragment in error["error"]["message"], error
    assert live.call("GET", f"/fleet/vehicles/{car}/consent")[1]["data"] == []


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", "policy"), ("PUT", "policy"), ("POST", "consent"), ("GET", "consent")],
)
@pytest.mark.parametrize("vehicle_id", ["bad%20id", "car.1", "x" * 65])
def test_an_invalid_vehicle_id_is_refused_with_400(
    live: LiveCoordinator, method: str, suffix: str, vehicle_id: str
) -> None:
    body: dict[str, Any] | None = {"opted_in": True} if method == "POST" else None
    if method == "PUT":
        body = {"policy": full_policy()}

    status, error = live.call(method, f"/fleet/vehicles/{vehicle_id}/{suffix}", body)

    assert status == 400
    assert "Invalid vehicle id" in error["error"]["message"]
    assert error["error"]["param"] == "vehicle_id"


# -- the fleet views ----------------------------------------------------------------------------


def test_vehicles_show_their_status_reason_and_consent(live: LiveCoordinator, car: str) -> None:
    register(live, car)
    live.work.heartbeat(car, Heartbeat(seq=1, status="paused", reason="not_charging"))
    before = _vehicle(live, car)
    live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True})

    after = _vehicle(live, car)

    assert (before["status"], before["status_reason"]) == ("paused", "not_charging")
    assert (before["policy_version"], before["opted_in"]) == (0, False)
    assert (after["policy_version"], after["opted_in"]) == (1, True)


def _vehicle(live: LiveCoordinator, vehicle_id: str) -> dict[str, Any]:
    _, body = live.call("GET", "/fleet/vehicles")
    (found,) = [v for v in body["data"] if v["id"] == vehicle_id]
    return found


def test_leases_show_purpose_region_energy_and_end_reason(live: LiveCoordinator, car: str) -> None:
    register(live, car)
    live.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True})
    record = live.batches.upload_file("in.jsonl", "batch", batch_input(["a", "b", "c"]))
    batch = live.batches.create_batch(
        record.id, "/v1/embeddings", "24h", purpose="research", data_region="eu"
    )
    live.batches.validate(batch.id)
    grant = live.work.work(car, WorkRequest(max_requests=3, models=[MODEL]))
    assert grant.lease_id is not None
    first = grant.items[0].seq
    vector = np.zeros((1, 384), dtype=np.float32)
    vector[0, 0] = 1.0
    chunk = ResultChunk(
        lease_id=grant.lease_id,
        seqs=[first],
        token_counts=[2],
        sizes=[4 * 384],
        data_b64=pack(vector.astype("<f4").tobytes()),
        energy_j=30.0,
    )
    live.work.results(car, chunk)
    live.work.release(car, Release(lease_id=grant.lease_id, reason="shutdown", energy_j=1.5))

    _, body = live.call("GET", "/fleet/leases?all=true", key="operator")

    (lease,) = [row for row in body["data"] if row["vehicle_id"] == car]
    assert (lease["state"], lease["end_reason"], lease["energy_j"]) == (
        "released",
        "shutdown",
        31.5,
    )
    assert (lease["purpose"], lease["data_region"]) == ("research", "eu")


# -- batch purpose and data region through the OpenAI SDK ----------------------------------------


@pytest.fixture(scope="module")
def client(live: LiveCoordinator) -> OpenAI:
    return OpenAI(base_url=f"{live.base_url}/v1", api_key=live.keys["acme"], max_retries=0)


def _upload(client: OpenAI) -> str:
    content = batch_input(["one", "two"])
    return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch").id


def test_a_batch_takes_purpose_and_region_through_extra_body(client: OpenAI) -> None:
    tagged = client.batches.create(
        input_file_id=_upload(client),
        endpoint="/v1/embeddings",
        completion_window="24h",
        extra_body={"purpose": "research", "data_region": "eu"},
    )
    plain = client.batches.create(
        input_file_id=_upload(client), endpoint="/v1/embeddings", completion_window="24h"
    )

    again = client.batches.retrieve(tagged.id)
    assert tagged.model_extra == {"purpose": "research", "data_region": "eu"}
    assert again.model_extra == {"purpose": "research", "data_region": "eu"}
    assert plain.model_extra == {"purpose": "general", "data_region": "global"}


@pytest.mark.parametrize(
    ("extra", "allowed"),
    [
        ({"purpose": "mining"}, "'general', 'research'"),
        ({"data_region": "mars"}, "'global', 'eu'"),
    ],
)
def test_an_unknown_purpose_or_region_is_refused_naming_the_allowed_values(
    client: OpenAI, extra: dict[str, str], allowed: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(
            input_file_id=_upload(client),
            endpoint="/v1/embeddings",
            completion_window="24h",
            extra_body=extra,
        )

    (name,) = extra
    assert refused.value.status_code == 400
    assert f"Invalid value for '{name}'" in refused.value.message
    assert allowed in refused.value.message


def test_a_body_that_is_not_json_says_so_in_its_code(live: LiveCoordinator, car: str) -> None:
    status, error = live.call("POST", f"/fleet/vehicles/{car}/consent", raw=b"opted_in=1")

    assert status == 400
    assert error["error"]["code"] == "invalid_json"
    assert error["error"]["message"].startswith("Invalid JSON")
