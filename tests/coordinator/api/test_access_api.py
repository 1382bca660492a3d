"""Who may call what, and how often: every refusal of API keys, roles, ownership and quotas,
over real HTTP against the real app (see ``live.py``), through the OpenAI SDK where a customer
would use it.

The server is shared by the module; a test that needs a key of its own (a quota, a revocation)
makes one in the store, so no test spends another's quota.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.access import Quotas, Role, new_api_key
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    Release,
    ResultChunk,
    WorkRequest,
    pack,
)
from tests.coordinator.api.live import LiveCoordinator, live_coordinator

MODEL = "all-MiniLM-L6-v2"
_ids = itertools.count()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    with live_coordinator(tmp_path_factory.mktemp("access-api")) as running:
        yield running


SdkFactory = Callable[[str], OpenAI]


@pytest.fixture
def sdk(live: LiveCoordinator) -> Iterator[SdkFactory]:
    """OpenAI clients of ``live`` by key secret (no retries: a 429 must reach the test)."""
    clients: list[OpenAI] = []

    def client(secret: str) -> OpenAI:
        made = OpenAI(base_url=f"{live.base_url}/v1", api_key=secret, max_retries=0)
        clients.append(made)
        return made

    yield client
    for made in clients:
        made.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def new_key(live: LiveCoordinator, role: Role, principal: str, **quotas: int) -> tuple[str, str]:
    """A new key in ``live``'s store: (secret, key id); ``quotas`` replace the role's defaults."""
    secret, record = new_api_key(
        role, principal, unique("key"), quotas=Quotas(**quotas) if quotas else None
    )
    live.work.store.put_api_key(record)
    return secret, record.id


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: Any


def send(
    live: LiveCoordinator,
    method: str,
    path: str,
    *,
    authorization: str | None = None,
    body: Any = None,
) -> Reply:
    """One request with exactly this ``Authorization`` header (None: none); unlike
    ``live.call``, it also returns the response headers."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(
        live.base_url + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, response.headers, json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, json.loads(exc.read()))


def bearer(live: LiveCoordinator, name: str) -> str:
    return f"Bearer {live.keys[name]}"


def said(error: openai.APIStatusError) -> str:
    """The server's message (the SDK's ``message`` prefixes the status)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def upload(client: OpenAI, lines: int = 2) -> str:
    content = batch_input([f"text {i}" for i in range(lines)])
    return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch").id


def create_batch(client: OpenAI, file_id: str) -> openai.types.Batch:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
    )


def wait_for_status(client: OpenAI, batch_id: str, status: str) -> None:
    """Validation runs in the server's background after the create returns."""
    deadline = time.monotonic() + 10
    while (found := client.batches.retrieve(batch_id).status) != status:
        assert time.monotonic() < deadline, f"batch {batch_id} stuck in {found}"
        time.sleep(0.02)


# -- authentication ------------------------------------------------------------------------------

SOME_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/embeddings"),
    ("GET", "/fleet/vehicles"),
    ("GET", "/fleet/vehicles/car-1/policy"),
    ("GET", "/fleet/enrolments"),
    ("GET", "/fleet/leases"),
    ("GET", "/fleet/security"),
]


def test_health_needs_no_key(live: LiveCoordinator) -> None:
    reply = send(live, "GET", "/healthz")

    assert (reply.status, reply.body) == (200, {"status": "ok"})


@pytest.mark.parametrize(("method", "path"), SOME_ROUTES)
def test_a_request_without_a_key_is_401_missing_api_key(
    live: LiveCoordinator, method: str, path: str
) -> None:
    reply = send(live, method, path, body={} if method == "POST" else None)

    assert reply.status == 401
    error = reply.body["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "missing_api_key")
    assert "Authorization: Bearer YOUR_KEY" in error["message"]


@pytest.mark.parametrize(
    "authorization",
    ["Basic YWNtZTpzZWNyZXQ=", "Bearer", "Token ifk_c_abc", "ifk_c_just-the-key"],
    ids=["basic", "bearer-without-key", "other-scheme", "no-scheme"],
)
def test_a_malformed_authorization_header_is_401_invalid_api_key(
    live: LiveCoordinator, authorization: str
) -> None:
    reply = send(live, "GET", "/v1/models", authorization=authorization)

    assert reply.status == 401
    assert reply.body["error"]["code"] == "invalid_api_key"
    assert "must be 'Bearer <your API key>'" in reply.body["error"]["message"]


def test_the_bearer_scheme_is_case_insensitive(live: LiveCoordinator) -> None:
    reply = send(live, "GET", "/v1/models", authorization=f"bearer {live.keys['acme']}")

    assert reply.status == 200


def test_a_wrong_key_is_401_and_the_message_shows_only_its_ends(sdk: SdkFactory) -> None:
    made_up = "ifk_c_" + "q" * 39 + "WXYZ"

    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(made_up).models.list()

    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"
    assert "Incorrect API key provided: ifk_c_********WXYZ." in refused.value.message
    assert made_up not in refused.value.message


def test_a_key_revoked_before_its_first_use_is_refused_at_once(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    secret, key_id = new_key(live, Role.CUSTOMER, "acme")
    assert live.work.store.revoke_api_key(key_id, time.time())

    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(secret).models.list()

    assert refused.value.code == "invalid_api_key"
    assert "has been revoked" in refused.value.message


def test_a_revoked_key_stops_working_within_the_key_cache_period(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    secret, key_id = new_key(live, Role.CUSTOMER, "acme")
    client = sdk(secret)
    client.models.list()  # now in the server's key cache, as valid

    revoked_at = time.monotonic()
    assert live.work.store.revoke_api_key(key_id, time.time())
    refused: openai.AuthenticationError | None = None
    while refused is None and time.monotonic() - revoked_at < 3.0:  # the cache holds 2 s
        try:
            client.models.list()
        except openai.AuthenticationError as exc:
            refused = exc
        else:
            time.sleep(0.05)

    assert refused is not None, "the revoked key still worked 3 s after its revocation"
    assert refused.code == "invalid_api_key"
    assert "has been revoked" in refused.message
    with pytest.raises(openai.AuthenticationError):
        client.models.list()  # and stays refused


# -- roles ---------------------------------------------------------------------------------------

WRONG_ROLES = [
    ("alice", "GET", "/v1/batches", "owner", "customer"),
    ("alice", "POST", "/v1/embeddings", "owner", "customer"),
    ("operator", "GET", "/v1/batches/batch_x", "operator", "customer"),
    ("acme", "GET", "/fleet/leases", "customer", "operator"),
    ("acme", "GET", "/fleet/vehicles", "customer", "owner or operator"),
    ("acme", "GET", "/fleet/vehicles/car-1/policy", "customer", "owner or operator"),
    ("acme", "POST", "/fleet/vehicles/car-1/consent", "customer", "owner or operator"),
    ("acme", "GET", "/fleet/batches/batch_x/vehicles", "customer", "operator"),
    ("alice", "GET", "/fleet/leases", "owner", "operator"),
    ("alice", "GET", "/fleet/dispatch", "owner", "operator"),
    ("alice", "GET", "/fleet/security", "owner", "operator"),
    ("bob", "POST", "/fleet/enrolments", "owner", "operator"),
    ("bob", "DELETE", "/fleet/enrolments/car-1", "owner", "operator"),
]


@pytest.mark.parametrize(
    ("key", "method", "path", "role", "needed"),
    WRONG_ROLES,
    ids=[f"{k}-{m}-{p}" for k, m, p, *_ in WRONG_ROLES],
)
def test_a_key_of_the_wrong_role_is_403(
    live: LiveCoordinator, key: str, method: str, path: str, role: str, needed: str
) -> None:
    # A body that would be valid, so that nothing but the role can refuse it.
    body: dict[str, Any] | None = {"opted_in": True} if path.endswith("consent") else None
    if path.endswith("embeddings"):
        body = {"model": MODEL, "input": "hello"}

    status, error = live.call(method, path, body, key=key)

    assert status == 403
    assert error["error"]["code"] == "insufficient_permissions"
    assert f"the role '{role}'; this operation needs {needed}." in error["error"]["message"]


def test_an_owner_key_in_the_openai_sdk_is_permission_denied(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk(live.keys["alice"]).batches.list()

    assert refused.value.status_code == 403


@pytest.mark.parametrize("key", ["acme", "alice", "operator"])
def test_every_role_may_list_the_models(live: LiveCoordinator, key: str) -> None:
    status, body = live.call("GET", "/v1/models", key=key)
    _, one = live.call("GET", f"/v1/models/{MODEL}", key=key)

    assert status == 200
    assert MODEL in [m["id"] for m in body["data"]]
    assert one["id"] == MODEL


# -- customers: their own files and batches only -------------------------------------------------


@dataclass(frozen=True)
class Globex:
    file_id: str
    batch_id: str


@pytest.fixture(scope="module")
def globex(live: LiveCoordinator) -> Iterator[Globex]:
    """A file and a batch of globex, made before acme asks for them."""
    with OpenAI(
        base_url=f"{live.base_url}/v1", api_key=live.keys["globex"], max_retries=0
    ) as client:
        file_id = upload(client)
        yield Globex(file_id, create_batch(client, file_id).id)


def test_another_customers_batch_is_not_found_to_get_or_cancel(
    live: LiveCoordinator, sdk: SdkFactory, globex: Globex
) -> None:
    acme = sdk(live.keys["acme"])

    with pytest.raises(openai.NotFoundError) as got:
        acme.batches.retrieve(globex.batch_id)
    with pytest.raises(openai.NotFoundError) as cancelled:
        acme.batches.cancel(globex.batch_id)

    # The same answer as for a batch that does not exist: its existence is not acme's business.
    assert said(got.value) == f"No batch found with id '{globex.batch_id}'."
    assert said(cancelled.value) == said(got.value)
    theirs = sdk(live.keys["globex"]).batches.retrieve(globex.batch_id)
    assert theirs.status not in ("cancelling", "cancelled")
    assert theirs.cancelling_at is None


def test_another_customers_file_is_not_found_nor_its_content(
    live: LiveCoordinator, sdk: SdkFactory, globex: Globex
) -> None:
    acme = sdk(live.keys["acme"])

    with pytest.raises(openai.NotFoundError) as record:
        acme.files.retrieve(globex.file_id)
    with pytest.raises(openai.NotFoundError) as content:
        acme.files.content(globex.file_id)

    assert said(record.value) == f"No such File object: {globex.file_id}"
    assert said(content.value) == said(record.value)
    assert sdk(live.keys["globex"]).files.content(globex.file_id).content == batch_input(
        ["text 0", "text 1"]
    )


def test_a_batch_cannot_be_made_of_another_customers_file(
    live: LiveCoordinator, sdk: SdkFactory, globex: Globex
) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        create_batch(sdk(live.keys["acme"]), globex.file_id)

    assert refused.value.param == "input_file_id"
    assert f"No such File object: {globex.file_id}" in refused.value.message


def test_the_batch_list_shows_only_the_callers_batches(
    live: LiveCoordinator, sdk: SdkFactory, globex: Globex
) -> None:
    acme, other = sdk(live.keys["acme"]), sdk(live.keys["globex"])
    mine = [create_batch(acme, upload(acme)).id for _ in range(3)]

    acme_sees = [b.id for b in acme.batches.list(limit=2)]  # the SDK pages through them all
    globex_sees = [b.id for b in other.batches.list(limit=100)]
    status, after_theirs = live.call("GET", f"/v1/batches?after={globex.batch_id}", key="acme")

    assert acme_sees[:3] == list(reversed(mine))  # newest first
    assert globex.batch_id not in acme_sees
    assert globex.batch_id in globex_sees
    assert not set(mine) & set(globex_sees)
    assert (status, after_theirs["error"]["param"]) == (404, "after")


def test_the_operator_may_see_which_cars_ran_any_batch(
    live: LiveCoordinator, globex: Globex
) -> None:
    status, body = live.call("GET", f"/fleet/batches/{globex.batch_id}/vehicles", key="operator")

    assert status == 200
    assert body == {"batch_id": globex.batch_id, "completed_by_vehicle": {}}


def register(live: LiveCoordinator, vehicle_id: str) -> None:
    hardware = Hardware(accelerator="cpu", tops=1, memory_gb=1, power_w=10)
    request = RegisterRequest(
        protocol_version=1, agent_version="t", hardware=hardware, models=[MODEL]
    )
    assert live.work.register(vehicle_id, request).accepted


def test_a_batchs_output_and_error_files_belong_to_its_customer(tmp_path: Path) -> None:
    # A stack of its own: the car below must lease this batch, not another test's.
    with live_coordinator(tmp_path) as own:
        car = "car-out"
        own.enrol(car)
        register(own, car)
        assert own.call("POST", f"/fleet/vehicles/{car}/consent", {"opted_in": True})[0] == 200
        with (
            OpenAI(base_url=f"{own.base_url}/v1", api_key=own.keys["acme"], max_retries=0) as acme,
            OpenAI(base_url=f"{own.base_url}/v1", api_key=own.keys["globex"], max_retries=0) as gx,
        ):
            batch = create_batch(acme, upload(acme, lines=2))
            wait_for_status(acme, batch.id, "in_progress")
            # The car finishes one request and gives the other back; then acme cancels: one
            # line in the output file, one (cancelled) in the error file.
            grant = own.work.work(car, WorkRequest(max_requests=2, models=[MODEL]))
            assert grant.lease_id is not None and len(grant.items) == 2
            vector = np.zeros((1, 384), dtype="<f4")
            vector[0, 0] = 1.0
            own.work.results(
                car,
                ResultChunk(
                    lease_id=grant.lease_id,
                    seqs=[grant.items[0].seq],
                    token_counts=[2],
                    sizes=[4 * 384],
                    data_b64=pack(vector.tobytes()),
                ),
            )
            own.work.release(car, Release(lease_id=grant.lease_id, reason="shutdown"))
            acme.batches.cancel(batch.id)
            done = acme.batches.retrieve(batch.id)
            files = [done.output_file_id, done.error_file_id]

            assert done.status == "cancelled"
            assert all(file_id is not None for file_id in files)
            for file_id in files:
                assert file_id is not None
                assert acme.files.retrieve(file_id).id == file_id
                assert len(acme.files.content(file_id).content.splitlines()) == 1
                with pytest.raises(openai.NotFoundError):
                    gx.files.retrieve(file_id)
                with pytest.raises(openai.NotFoundError):
                    gx.files.content(file_id)


# -- owners: their own cars only -----------------------------------------------------------------


@pytest.fixture
def alices_car(live: LiveCoordinator) -> str:
    vehicle_id = unique("alices")
    live.enrol(vehicle_id, owner="alice")
    return vehicle_id


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "policy", None),
        ("PUT", "policy", {"policy": {"opted_in": True}}),
        ("POST", "consent", {"opted_in": True}),
        ("GET", "consent", None),
    ],
)
def test_another_owner_can_neither_read_nor_change_a_car(
    live: LiveCoordinator, alices_car: str, method: str, suffix: str, body: Any
) -> None:
    status, error = live.call(method, f"/fleet/vehicles/{alices_car}/{suffix}", body, key="bob")

    assert status == 404
    assert error["error"]["code"] == "vehicle_not_found"
    assert error["error"]["message"] == f"No vehicle '{alices_car}' is enrolled under your name."
    assert live.work.owners.current(alices_car).version == 0


def test_an_owner_cannot_reach_a_car_nobody_enrolled(live: LiveCoordinator) -> None:
    status, error = live.call(
        "POST", f"/fleet/vehicles/{unique('nobodys')}/consent", {"opted_in": True}
    )

    assert status == 404
    assert error["error"]["code"] == "vehicle_not_found"


def test_the_consent_record_names_the_key_behind_each_change(
    live: LiveCoordinator, alices_car: str
) -> None:
    path = f"/fleet/vehicles/{alices_car}/consent"
    live.call("POST", path, {"opted_in": True}, key="alice")
    live.call("POST", path, {"opted_in": False}, key="bob")  # refused: not bob's car
    live.call("POST", path, {"opted_in": False}, key="operator")

    status, record = live.call("GET", path, key="alice")
    _, as_operator = live.call("GET", path, key="operator")

    assert status == 200
    assert [(r["version"], r["opted_in"], r["actor"]) for r in record["data"]] == [
        (1, True, "owner:alice"),
        (2, False, "operator:ops"),
    ]
    assert as_operator == record


def test_the_operator_may_set_any_cars_policy(live: LiveCoordinator, alices_car: str) -> None:
    status, body = live.call(
        "PUT",
        f"/fleet/vehicles/{alices_car}/policy",
        {"policy": {"opted_in": True, "soc_floor_percent": 70}},
        key="operator",
    )

    assert status == 200
    assert (body["version"], body["actor"]) == (1, "operator:ops")
    assert live.call("GET", f"/fleet/vehicles/{alices_car}/policy")[1]["policy"]["opted_in"]


def test_an_owner_sees_only_their_own_cars_and_the_operator_every_car(
    live: LiveCoordinator,
) -> None:
    alices, bobs = unique("alices"), unique("bobs")
    for vehicle_id, owner in ((alices, "alice"), (bobs, "bob")):
        live.enrol(vehicle_id, owner=owner)
        register(live, vehicle_id)

    seen = {
        key: {v["id"] for v in live.call("GET", "/fleet/vehicles", key=key)[1]["data"]}
        for key in ("alice", "bob", "operator")
    }
    enrolled = {
        key: {e["vehicle_id"] for e in live.call("GET", "/fleet/enrolments", key=key)[1]["data"]}
        for key in ("alice", "bob", "operator")
    }

    for view in (seen, enrolled):
        assert alices in view["alice"] and bobs not in view["alice"]
        assert bobs in view["bob"] and alices not in view["bob"]
        assert {alices, bobs} <= view["operator"]
    assert {e.vehicle_id for e in live.work.store.enrolments("alice")} == enrolled["alice"]


# -- enrolment (operators) -----------------------------------------------------------------------


def new_nkey() -> str:
    return public_nkey(new_nkey_seed())


def test_the_operator_enrols_a_car_under_an_owner(live: LiveCoordinator) -> None:
    vehicle_id, nkey = unique("enrolled"), new_nkey()

    status, body = live.call(
        "POST",
        "/fleet/enrolments",
        {"vehicle_id": vehicle_id, "nkey": nkey, "owner": "bob"},
        key="operator",
    )

    assert status == 201
    assert {k: body[k] for k in ("object", "vehicle_id", "nkey", "owner", "status")} == {
        "object": "fleet.enrolment",
        "vehicle_id": vehicle_id,
        "nkey": nkey,
        "owner": "bob",
        "status": "enrolled",
    }
    assert body["revoked_at"] is None
    assert live.call("GET", f"/fleet/vehicles/{vehicle_id}/policy", key="bob")[0] == 200
    assert live.call("GET", f"/fleet/vehicles/{vehicle_id}/policy", key="alice")[0] == 404


def test_enrolling_an_enrolled_car_or_another_cars_nkey_is_409(live: LiveCoordinator) -> None:
    first, nkey = unique("enrolled"), new_nkey()
    enrol = {"vehicle_id": first, "nkey": nkey, "owner": "alice"}
    assert live.call("POST", "/fleet/enrolments", enrol, key="operator")[0] == 201

    again = live.call("POST", "/fleet/enrolments", enrol | {"nkey": new_nkey()}, key="operator")
    stolen = live.call(
        "POST", "/fleet/enrolments", enrol | {"vehicle_id": unique("other")}, key="operator"
    )

    for status, error in (again, stolen):
        assert status == 409
        assert error["error"]["code"] == "already_enrolled"
    assert "revoke it first" in again[1]["error"]["message"]
    assert f"already the key of car {first}" in stolen[1]["error"]["message"]
    kept = live.work.store.get_enrolment(first)
    assert kept is not None and kept.nkey == nkey


BAD_ENROLMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("short-nkey", {"nkey": "UABC"}, "nkey"),
    ("seed-not-public-key", {"nkey": new_nkey_seed()[:56]}, "nkey"),
    ("lowercase-nkey", {"nkey": new_nkey().lower()}, "nkey"),
    ("no-owner", {"owner": None}, "owner"),
    ("bad-vehicle-id", {"vehicle_id": "bad id"}, "vehicle_id"),
    ("extra-field", {"role": "operator"}, "role"),
]


@pytest.mark.parametrize(
    ("change", "param"), [b[1:] for b in BAD_ENROLMENTS], ids=[b[0] for b in BAD_ENROLMENTS]
)
def test_a_bad_enrolment_is_400_naming_the_field(
    live: LiveCoordinator, change: dict[str, Any], param: str
) -> None:
    body = {"vehicle_id": unique("bad"), "nkey": new_nkey(), "owner": "alice"} | change
    body = {k: v for k, v in body.items() if v is not None}

    status, error = live.call("POST", "/fleet/enrolments", body, key="operator")

    assert status == 400
    assert error["error"]["param"] == param
    assert live.work.store.get_enrolment(str(body["vehicle_id"])) is None


def test_revoking_cuts_a_car_off_and_it_comes_back_only_with_a_new_nkey(
    live: LiveCoordinator,
) -> None:
    vehicle_id, old = unique("revoked"), new_nkey()
    enrol = {"vehicle_id": vehicle_id, "nkey": old, "owner": "alice"}
    live.call("POST", "/fleet/enrolments", enrol, key="operator")

    status, revoked = live.call("DELETE", f"/fleet/enrolments/{vehicle_id}", key="operator")
    again = live.call("DELETE", f"/fleet/enrolments/{vehicle_id}", key="operator")
    unknown = live.call("DELETE", f"/fleet/enrolments/{unique('never')}", key="operator")
    with_old_nkey = live.call("POST", "/fleet/enrolments", enrol, key="operator")
    new = new_nkey()
    with_new_nkey = live.call("POST", "/fleet/enrolments", enrol | {"nkey": new}, key="operator")

    assert status == 200
    assert (revoked["status"], revoked["vehicle_id"]) == ("revoked", vehicle_id)
    assert isinstance(revoked["revoked_at"], float)
    assert again == (200, revoked)  # revoking twice changes nothing
    assert unknown[0] == 404
    assert with_old_nkey[0] == 409  # a revoked key is never reinstated
    assert with_new_nkey[0] == 201
    assert (with_new_nkey[1]["nkey"], with_new_nkey[1]["status"]) == (new, "enrolled")


# -- quotas --------------------------------------------------------------------------------------


def test_a_response_carries_the_keys_rate_limit_headers(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    response = sdk(live.keys["acme"]).models.with_raw_response.list()

    assert response.headers["x-ratelimit-limit-requests"] == "3000"
    assert int(response.headers["x-ratelimit-remaining-requests"]) < 3000
    assert response.headers["x-ratelimit-limit-tokens"] == "2000000"
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")


def test_the_request_after_the_per_minute_quota_is_429_with_when_to_retry(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    secret, _ = new_key(live, Role.CUSTOMER, "tiny", requests_per_minute=2)
    client = sdk(secret)

    started = time.monotonic()
    first = client.models.with_raw_response.list()
    second = client.models.with_raw_response.list()
    with pytest.raises(openai.RateLimitError) as third:
        client.models.list()
    elapsed = time.monotonic() - started

    assert [r.headers["x-ratelimit-limit-requests"] for r in (first, second)] == ["2", "2"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]
    refused = third.value
    assert (refused.status_code, refused.code) == (429, "rate_limit_exceeded")
    assert "Rate limit reached for requests per minute" in refused.message
    headers = refused.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # One request comes back every 30 s (2 a minute), less the moments since the second.
    reset_s = float(headers["x-ratelimit-reset-requests"].removesuffix("s"))
    assert 30 - elapsed - 0.1 <= reset_s <= 30
    assert 1 <= int(headers["retry-after"]) <= 30


def test_the_requests_quota_is_per_key(live: LiveCoordinator, sdk: SdkFactory) -> None:
    spent, _ = new_key(live, Role.CUSTOMER, "acme", requests_per_minute=1)
    fresh, _ = new_key(live, Role.CUSTOMER, "acme", requests_per_minute=1)
    sdk(spent).models.list()

    with pytest.raises(openai.RateLimitError):
        sdk(spent).models.list()
    sdk(fresh).models.list()  # the same principal, another key: its own bucket


def test_online_requests_spend_tokens_per_minute(live: LiveCoordinator, sdk: SdkFactory) -> None:
    secret, _ = new_key(live, Role.CUSTOMER, "tiny", tokens_per_minute=20)
    client = sdk(secret)

    # 10 characters are at most 12 tokens ([CLS] and [SEP]): within the quota, so the request
    # goes on, and fails only because this server has no cars (it is refused after the quota).
    with pytest.raises(openai.InternalServerError) as no_capacity:
        client.embeddings.create(model=MODEL, input="x" * 10)
    with pytest.raises(openai.RateLimitError) as over_what_is_left:
        client.embeddings.create(model=MODEL, input="x" * 10)
    with pytest.raises(openai.RateLimitError) as over_the_whole_quota:
        client.embeddings.create(model=MODEL, input="x" * 30)

    assert (no_capacity.value.status_code, no_capacity.value.code) == (503, "no_capacity")
    assert said(no_capacity.value) == "online inference is not configured"
    left = over_what_is_left.value
    assert left.code == "rate_limit_exceeded"
    assert "limit 20, remaining 8, requested 12" in left.message
    assert left.response.headers["x-ratelimit-limit-tokens"] == "20"
    assert left.response.headers["x-ratelimit-remaining-tokens"] == "8"
    assert 1 <= int(left.response.headers["retry-after"]) <= 12  # 4 tokens at 20 a minute
    whole = over_the_whole_quota.value
    assert "larger than the key's whole limit" in whole.message
    assert "retry-after" not in whole.response.headers  # waiting would not help
    assert whole.response.headers["x-ratelimit-reset-tokens"] == "never"


def test_a_batch_past_the_queued_request_limit_is_429(
    live: LiveCoordinator, sdk: SdkFactory
) -> None:
    secret, _ = new_key(live, Role.CUSTOMER, unique("queue"), queued_requests=3)
    client = sdk(secret)

    with pytest.raises(openai.RateLimitError) as too_big:
        create_batch(client, upload(client, lines=5))
    first = create_batch(client, upload(client, lines=2))
    wait_for_status(client, first.id, "in_progress")  # its 2 requests are queued now
    with pytest.raises(openai.RateLimitError) as too_many:
        create_batch(client, upload(client, lines=2))
    client.batches.cancel(first.id)
    after_cancel = create_batch(client, upload(client, lines=2))

    assert (too_big.value.status_code, too_big.value.code) == (429, "request_limit_exceeded")
    assert "0 are queued and this batch adds 5" in too_big.value.message
    assert too_big.value.response.headers["x-ratelimit-limit-queued-requests"] == "3"
    assert too_big.value.response.headers["x-ratelimit-remaining-queued-requests"] == "3"
    assert too_many.value.code == "request_limit_exceeded"
    assert "2 are queued and this batch adds 2" in too_many.value.message
    assert too_many.value.response.headers["x-ratelimit-remaining-queued-requests"] == "1"
    assert after_cancel.status == "validating"


# -- the operator's count of refusals ------------------------------------------------------------

REASONS = (
    "missing_key",
    "malformed_key",
    "wrong_key",
    "revoked_key",
    "wrong_role",
    "rate_limited",
    "not_yours",
    "not_your_vehicle",
)


def test_the_security_view_counts_each_refusal_by_reason(
    live: LiveCoordinator, globex: Globex, alices_car: str
) -> None:
    revoked, revoked_id = new_key(live, Role.CUSTOMER, "acme")
    live.work.store.revoke_api_key(revoked_id, time.time())
    limited, _ = new_key(live, Role.CUSTOMER, "acme", requests_per_minute=1)
    before = live.call("GET", "/fleet/security", key="operator")[1]["http_refused"]

    refusals = [
        send(live, "GET", "/v1/models"),
        send(live, "GET", "/v1/models", authorization="Basic eDp5"),
        send(live, "GET", "/v1/models", authorization="Bearer ifk_c_made-up-key-0123456789"),
        send(live, "GET", "/v1/models", authorization=f"Bearer {revoked}"),
        send(live, "GET", "/fleet/leases", authorization=bearer(live, "acme")),
        send(live, "GET", "/v1/models", authorization=f"Bearer {limited}"),
        send(live, "GET", "/v1/models", authorization=f"Bearer {limited}"),
        send(live, "GET", f"/v1/batches/{globex.batch_id}", authorization=bearer(live, "acme")),
        send(
            live, "GET", f"/fleet/vehicles/{alices_car}/policy", authorization=bearer(live, "bob")
        ),
    ]
    status, security = live.call("GET", "/fleet/security", key="operator")

    assert [r.status for r in refusals] == [401, 401, 401, 401, 403, 200, 429, 404, 404]
    assert status == 200
    after = security["http_refused"]
    changed = {
        reason: after.get(reason, 0) - before.get(reason, 0)
        for reason in after.keys() | before.keys()
        if after.get(reason, 0) != before.get(reason, 0)
    }
    assert changed == dict.fromkeys(REASONS, 1)


# -- found in review ---------------------------------------------------------------------------


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(
    live: LiveCoordinator,
) -> None:
    # FastAPI spools a multipart upload to disk before any route dependency runs: the key is
    # checked first, so an anonymous sender cannot fill the disk. The request announces 1 GB
    # and sends none of it; the answer comes anyway.
    address = urlsplit(live.base_url)
    connection = http.client.HTTPConnection(str(address.hostname), address.port, timeout=5)
    try:
        connection.putrequest("POST", "/v1/files")
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Content-Length", str(1 << 30))
        connection.endheaders()
        response = connection.getresponse()
        refusal = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 401 and refusal["error"]["code"] == "missing_api_key"
    assert send(live, "GET", "/openapi.json").status == 200  # the API's description is open


def test_parallel_batches_cannot_all_pass_the_queue_quota(live: LiveCoordinator) -> None:
    secret, _ = new_key(live, Role.CUSTOMER, unique("queue"), queued_requests=3)
    with OpenAI(base_url=f"{live.base_url}/v1", api_key=secret, max_retries=0) as client:
        file_id = upload(client, lines=2)

        def attempt(_: int) -> str:
            try:
                create_batch(client, file_id)
            except openai.RateLimitError:
                return "refused"
            return "created"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(8)))

    assert sorted(outcomes) == ["created"] + ["refused"] * 7


def test_a_revoked_car_is_nobodys_and_a_new_owner_starts_opted_out(
    live: LiveCoordinator,
) -> None:
    vehicle_id = unique("sold")
    live.enrol(vehicle_id, owner="alice")
    assert live.call("POST", f"/fleet/vehicles/{vehicle_id}/consent", {"opted_in": True})[0] == 200

    live.call("DELETE", f"/fleet/enrolments/{vehicle_id}", key="operator")
    after_revocation = live.call("GET", f"/fleet/vehicles/{vehicle_id}/policy")[0]
    enrolled = live.call(
        "POST",
        "/fleet/enrolments",
        {"vehicle_id": vehicle_id, "nkey": new_nkey(), "owner": "bob"},
        key="operator",
    )[0]
    status, policy = live.call("GET", f"/fleet/vehicles/{vehicle_id}/policy", key="bob")

    assert after_revocation == 404  # alice no longer controls a car that is not hers
    assert enrolled == 201 and status == 200
    assert policy["policy"]["opted_in"] is False and policy["actor"] == "operator:ops"
