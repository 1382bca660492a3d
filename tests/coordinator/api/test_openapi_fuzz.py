"""Schemathesis against the coordinator's own ``/openapi.json``: every operation, with the key of
every role (and none), and stateful runs that follow the schema's links (upload a file → create
a batch → get, cancel; enrol a car → set its policy and consent → revoke).

The app is the production one on a SQLite store, called in-process (ASGI); online requests run
on a stand-in for the fleet that answers as a car would (``FakeFleet``), so a valid online
request gets a 200, not the 503 of an empty fleet. Each response must be no 5xx and must match
the schema: its status, content type, headers and body; and data the schema forbids must be
refused. Bounded for CI (the same examples every run); ``scripts/fuzz.py`` runs many more.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from idlefleet.coordinator.access import Quotas, Role, new_api_key
from idlefleet.coordinator.accounts import Customer
from idlefleet.coordinator.api import create_app
from idlefleet.coordinator.api.auth import Access
from idlefleet.coordinator.api.openapi_doc import OpenAIError
from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.metrics import Metrics
from idlefleet.coordinator.online import Watch
from idlefleet.coordinator.overview import Overview
from idlefleet.coordinator.store import Store, open_store, sqlite_url
from idlefleet.coordinator.work import WorkService
from idlefleet.models.catalog import MINILM, MODELS, SMOLLM2
from idlefleet.protocol.identity import new_nkey_seed, public_nkey
from idlefleet.protocol.policy import PolicyUpdate
from idlefleet.workloads import Workload
from idlefleet.workloads.base import Planned
from idlefleet.workloads.chat import encode_result
from tests.fuzzing import fuzz_settings
from tests.hostile import HOSTILE_TEXT, spoiled

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
ROLES = {"customer": Role.CUSTOMER, "owner": Role.OWNER, "operator": Role.OPERATOR}
_ROLES: list[str | None] = [*ROLES, None]


class FakeFleet:
    """Runs online requests as a car would, at once: unit vectors for embeddings, an empty
    completion that stops for chat (what the workloads' checks accept)."""

    async def run(
        self,
        workload: Workload,
        planned: Planned,
        watch: Watch | None = None,
        customer: Customer | None = None,
    ) -> tuple[bytes, int]:
        if workload.kind == "embeddings":
            rows = workload.expectation(planned.payload)
            dim = MODELS[planned.model].dim
            data = struct.pack(f"<{rows * dim}f", *([1.0] + [0.0] * (dim - 1)) * rows)
        else:
            prompt, _ = workload.expectation(planned.payload)
            data = encode_result([], "", "stop", prompt)
        tokens = planned.cost.tokens
        if watch is not None:
            watch.result(data, tokens)
        return data, tokens


class FuzzedApi:
    """The coordinator's app on a SQLite store in ``directory``; ``reset`` starts over on a new
    store (a stateful scenario must not meet the cars and batches of the one before it, or
    replaying it to shrink a failure would take other turns)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: dict[str, str] = {}
        """Key secrets by role name; unlimited quotas, so no 429 hides an operation."""
        self._app: Any = None
        self._store: Store | None = None
        self._stores = 0
        self.reset()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)

    def reset(self) -> None:
        self.close()
        self._stores += 1
        store = open_store(sqlite_url(self.directory / f"coordinator-{self._stores}.db"))
        batches = BatchService(store)
        work = WorkService(store, batches)
        for name, role in ROLES.items():
            secret, record = new_api_key(role, name, name, quotas=Quotas())
            store.put_api_key(record)
            self.keys[name] = secret

        async def validate(batch_id: str) -> None:
            # In the request's task, not a thread: a batch is validated before the next call,
            # so what a scenario sees does not depend on timing.
            batches.validate(batch_id)

        async def push(vehicle_id: str, update: PolicyUpdate) -> bool:
            return False  # the car is offline: it catches up through its heartbeat

        # As the server builds it: /metrics and /fleet/overview are fuzzed too.
        metrics = Metrics(fleet=lambda: store.fleet_counts(time.time() - 15))
        work.metrics = metrics
        self._app = create_app(
            batches,
            work,
            Access(store),
            FakeFleet(),
            validate,
            push,
            metrics=metrics,
            overview=Overview(work, metrics, lambda: "USD"),
        )
        self._store = store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedApi]:
    app = FuzzedApi(tmp_path_factory.mktemp("openapi-fuzz"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def api_schema(api: FuzzedApi) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    # The tests send each role's key themselves (or none), so schemathesis neither makes up
    # nor leaves out the Authorization header (``ignored_auth`` checks that a key is needed);
    # and a query parameter no operation declares is ignored, as HTTP APIs do, not "invalid".
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    return schema


def _checks(case: schemathesis.Case) -> list[Any]:
    """The checks of a case: all, but that negative data is refused for a multipart upload,
    where a part made "null" is sent as a file holding the bytes ``null``: a valid file."""
    if case.media_type == "multipart/form-data":
        return [c for c in CHECKS if c is not negative_data_rejection]
    return CHECKS


def _operations(api_schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    operations = []
    for result in api_schema.get_all_operations():
        if isinstance(result, Err):  # an operation the schema cannot describe fails here
            raise result.err()
        operations.append(result.ok())
    return operations


@pytest.mark.fuzz
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_its_schema_says(
    api_schema: schemathesis.BaseSchema, api: FuzzedApi, mode: GenerationMode
) -> None:
    """Each operation gets its own run (``fuzz_settings`` examples), with any role's key or
    none; the failures of all are reported together, each under its operation."""
    operations = _operations(api_schema)
    failures = []
    for operation in operations:

        @fuzz_settings(15)
        @given(case=operation.as_strategy(generation_mode=mode), role=st.sampled_from(_ROLES))
        def fuzz(case: schemathesis.Case, role: str | None) -> None:
            headers = {} if role is None else {"Authorization": f"Bearer {api.keys[role]}"}
            case.call_and_validate(headers=headers, checks=_checks(case))

        try:
            fuzz()
        except Unsatisfiable:  # nothing of it to negate (no parameters, no body)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as failure:
            failures.append(f"{operation.label}: {failure}")
    paths = api_schema.raw_schema["paths"]
    assert len(operations) == sum(len(methods) for methods in paths.values())
    assert not failures, "\n\n".join(failures)


def _key_for(api: FuzzedApi, path: str) -> str:
    """The role that may call ``path``: files, batches and inference are a customer's, the
    fleet API an operator's (who may do what an owner may)."""
    role = "customer" if path.startswith("/v1/") else "operator"
    return f"Bearer {api.keys[role]}"


@pytest.mark.fuzz
def test_linked_operations_answer_as_the_schema_says(
    api_schema: schemathesis.BaseSchema, api: FuzzedApi
) -> None:
    machine = api_schema.as_state_machine()

    class Keyed(machine):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            api.reset()

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": {"Authorization": _key_for(api, case.path)}}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            # Not ``negative_data_rejection``: a link's values (the file id) replace what a
            # negative case broke, and the key is always sent, so a step's data is often valid
            # after all. The operations' own runs above check that refusals are refused.
            case.validate_response(
                response,
                checks=[c for c in CHECKS if c is not negative_data_rejection],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Keyed.run(settings=fuzz_settings(15, stateful_step_count=8))


# -- hostile bodies: each route that parses JSON, and upload names --------------------------------

_ids = itertools.count()


def _bodies(api: FuzzedApi) -> dict[str, tuple[str, str, str, Callable[[], dict[str, Any]]]]:
    """Per route that reads a JSON body: (method, path, role, a valid body, made fresh)."""

    def batch() -> dict[str, Any]:
        uploaded = _call(api, "customer").post(
            "/v1/files", files={"file": ("in.jsonl", b"{}\n")}, data={"purpose": "batch"}
        )
        return {
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": {"project": "fuzz"},
        }

    return {
        "embeddings": (
            "POST",
            "/v1/embeddings",
            "customer",
            lambda: {
                "model": MINILM.id,
                "input": ["a parked car", "b"],
                "encoding_format": "float",
            },
        ),
        "chat": (
            "POST",
            "/v1/chat/completions",
            "customer",
            lambda: {
                "model": SMOLLM2.id,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stop": ["\n"],
            },
        ),
        "batch": ("POST", "/v1/batches", "customer", batch),
        "policy": (
            "PUT",
            "/fleet/vehicles/car-1/policy",
            "operator",
            lambda: {
                "policy": {
                    "opted_in": True,
                    "timezone": "Europe/Berlin",
                    "allowed_hours": ["22:00-07:00"],
                    "departure_time": "07:30",
                }
            },
        ),
        "consent": (
            "POST",
            "/fleet/vehicles/car-1/consent",
            "operator",
            lambda: {"opted_in": True, "purposes": ["research"], "data_regions": ["eu"]},
        ),
        "enrol": (
            "POST",
            "/fleet/enrolments",
            "operator",
            lambda: {
                "vehicle_id": f"fuzz-{next(_ids):09d}",  # one length: hypothesis replays
                "nkey": public_nkey(new_nkey_seed()),
                "owner": "owner",
            },
        ),
    }


def _call(api: FuzzedApi, role: str) -> Any:
    """An in-process HTTP client of ``api`` with ``role``'s key (schemathesis's ASGI client)."""
    client = asgi.get_client(api)
    client.headers["Authorization"] = f"Bearer {api.keys[role]}"
    return client


def _refusal_is_clear(status: int, body: bytes) -> None:
    assert status < 500, body[:300]
    if status >= 400:
        error = OpenAIError.model_validate_json(body).error
        assert error.message.strip() and error.type == "invalid_request_error", body[:300]


@pytest.mark.fuzz
@pytest.mark.parametrize("route", ["embeddings", "chat", "batch", "policy", "consent", "enrol"])
@fuzz_settings(30)
@given(data=st.data())
def test_a_hostile_body_gets_a_clear_4xx_and_the_next_good_one_works(
    api: FuzzedApi, route: str, data: st.DataObject
) -> None:
    method, path, role, valid = _bodies(api)[route]
    client = _call(api, role)
    body = data.draw(spoiled(valid()), label="body")

    hostile = client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    good = client.request(method, path, json=valid())

    _refusal_is_clear(hostile.status_code, hostile.content)
    assert 200 <= good.status_code < 300, good.text[:300]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "m", "input": "x", "user": 1' + b"0" * 5_000 + b"}",
        # A surrogate encoded as UTF-8 (not UTF-8): json.loads(bytes) took it, into a key the
        # refusal quoted, and the refusal could not be encoded.
        b'{"\xed\xa0\x80model": "m", "input": "x"}',
    ],
    ids=["nested", "5000-digits", "encoded-surrogate"],
)
def test_json_python_cannot_read_is_a_400_not_a_500(api: FuzzedApi, path: str, body: bytes) -> None:
    # RecursionError, the 4,300-digit limit and the surrogate each made a 500.
    answer = _call(api, "customer").post(path, data=body)

    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


@pytest.mark.fuzz
@fuzz_settings(30)
@example(name="🚗.jsonl")  # not Latin-1: its Content-Disposition was a 500
@example(name="in\x00.jsonl")  # PostgreSQL's text cannot hold it
@given(name=st.text(max_size=40) | st.sampled_from(HOSTILE_TEXT))
def test_any_file_name_is_uploaded_and_served_or_refused_clearly(api: FuzzedApi, name: str) -> None:
    assume(not any("\ud800" <= c <= "\udfff" for c in name))  # no client can send these
    client = _call(api, "customer")

    uploaded = client.post("/v1/files", files={"file": (name, b"{}\n")}, data={"purpose": "batch"})

    _refusal_is_clear(uploaded.status_code, uploaded.content)
    if uploaded.status_code == 200:
        served = client.get(f"/v1/files/{uploaded.json()['id']}/content")
        assert served.status_code == 200 and served.content == b"{}\n"
        served.headers["content-disposition"].encode("latin-1")  # a header as HTTP allows
