"""Tests for parse_batch_input: file-level errors fail the batch, request-level ones do not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types import Batch

from idlefleet.coordinator.batch_input import (
    MAX_REPORTED_ERRORS,
    BatchFileError,
    parse_batch_input,
    validate_batch_endpoint,
)
from idlefleet.coordinator.errors import InvalidRequest
from idlefleet.coordinator.openai_format import batch_errors_object
from idlefleet.models.catalog import SMOLLM2
from idlefleet.workloads.embeddings.request import MODEL_ID
from tests.fuzzing import fuzz_settings
from tests.hostile import spoiled

ENDPOINT = "/v1/embeddings"


def request(custom_id: str = "r1", **overrides: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": MODEL_ID, "input": f"text of {custom_id}"},
    }
    line.update(overrides)
    return line


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return ("\n".join(text) + "\n").encode("utf-8")


def only_error(data: bytes, **kwargs: Any) -> BatchFileError:
    parsed = parse_batch_input(data, ENDPOINT, **kwargs)
    assert parsed.failed
    assert parsed.requests == []
    assert len(parsed.errors) == 1, parsed.errors
    return parsed.errors[0]


# --- well-formed files -------------------------------------------------------------------------


def test_valid_file_yields_one_job_per_line() -> None:
    data = jsonl(
        request("a"),
        request("b", body={"model": MODEL_ID, "input": ["x", "y"], "encoding_format": "base64"}),
    )

    parsed = parse_batch_input(data, ENDPOINT)

    assert not parsed.failed and parsed.errors == []
    assert [(r.line, r.custom_id) for r in parsed.requests] == [(1, "a"), (2, "b")]
    first, second = parsed.requests
    assert first.planned is not None and first.error is None
    assert first.planned.payload == ["text of a"] and first.planned.options == "float"
    assert second.planned is not None and second.planned.payload == ["x", "y"]
    assert second.planned.options == "base64"
    assert second.planned.cost.inputs == 2
    assert (second.method, second.url) == ("POST", ENDPOINT)


def test_blank_lines_are_skipped_but_counted_in_line_numbers() -> None:
    data = b"\n" + jsonl(request("a"), "   ", request("b"))

    parsed = parse_batch_input(data, ENDPOINT)

    assert [(r.line, r.custom_id) for r in parsed.requests] == [(2, "a"), (4, "b")]


def test_file_without_trailing_newline_crlf_and_bom_are_accepted() -> None:
    data = ("\ufeff" + json.dumps(request("a")) + "\r\n" + json.dumps(request("b"))).encode()

    parsed = parse_batch_input(data, ENDPOINT)

    assert [r.custom_id for r in parsed.requests] == ["a", "b"]


def test_alias_model_resolves_in_the_planned_request() -> None:
    data = jsonl(request(body={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"}))

    (spec,) = parse_batch_input(data, ENDPOINT).requests

    assert spec.planned is not None and spec.planned.model == MODEL_ID


# --- request-level problems: the batch still runs ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": MODEL_ID, "input": ""}, None),
        ({"model": MODEL_ID}, "missing_required_parameter"),
        ({"model": MODEL_ID, "input": [1, 2, 3]}, "unsupported_value"),
        ({"model": MODEL_ID, "input": ["x"] * 2049}, "array_above_max_length"),
        ({"model": MODEL_ID, "input": "x", "encoding_format": "hex"}, "invalid_value"),
        ({"model": MODEL_ID, "input": "x", "dimensions": 128}, "unsupported_value"),
        ({"model": MODEL_ID, "input": "x", "stream": True}, None),
    ],
    ids=["empty", "no-input", "tokens", "too-many", "format", "dimensions", "unknown-field"],
)
def test_bad_body_fails_only_its_request(body: dict[str, Any], code: str | None) -> None:
    data = jsonl(request("good"), request("bad", body=body), request("good-2"))

    parsed = parse_batch_input(data, ENDPOINT)

    assert not parsed.failed
    good, bad, good2 = parsed.requests
    assert good.planned is not None and good2.planned is not None
    assert bad.planned is None
    assert isinstance(bad.error, InvalidRequest)
    assert bad.error.http_status == 400
    assert bad.error.code == code
    assert bad.body == body


# --- file-level problems: the batch fails ------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\n\n", b"  \r\n\t\n"], ids=["empty", "newlines", "spaces"])
def test_empty_file(data: bytes) -> None:
    error = only_error(data)

    assert (error.code, error.line) == ("empty_file", None)


def test_malformed_json_line_gets_openais_error() -> None:
    data = jsonl(request("a"), '{"custom_id": "b", "method": "POST"', request("c"))

    error = only_error(data)

    assert error == BatchFileError(
        code="invalid_json_line", message="This line is not parseable as valid JSON.", line=2
    )


def test_nan_is_not_json() -> None:
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": NaN}'

    assert only_error(jsonl(line)).code == "invalid_json_line"


def test_non_utf8_line_is_reported_on_its_line() -> None:
    data = jsonl(request("a")) + b'{"custom_id": "\xff\xfe"}\n' + jsonl(request("c"))

    error = only_error(data)

    assert (error.code, error.line) == ("invalid_json_line", 2)
    assert "UTF-8" in error.message


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "42", "null"])
def test_line_that_is_not_an_object(line: str) -> None:
    error = only_error(jsonl(request("a"), line))

    assert (error.code, error.line) == ("invalid_request", 2)


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_missing_required_field(field: str) -> None:
    line = request("a")
    del line[field]

    error = only_error(jsonl(line))

    assert error == BatchFileError(
        code="missing_required_parameter",
        message=f"Missing required parameter: '{field}'.",
        line=1,
        param=field,
    )


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [("custom_id", 7, "an integer"), ("method", None, "null"), ("url", ["/v1"], "an array")],
)
def test_field_of_wrong_type(field: str, value: object, kind: str) -> None:
    line = request("a")
    line[field] = value

    error = only_error(jsonl(line))

    assert (error.code, error.param, error.line) == ("invalid_type", field, 1)
    assert error.message == (
        f"Invalid type for '{field}': expected a string, but got {kind} instead."
    )


def test_body_that_is_not_an_object() -> None:
    error = only_error(jsonl(request("a", body="embed this")))

    assert (error.code, error.param) == ("invalid_type", "body")


def test_duplicate_custom_id_is_reported_on_the_second_line() -> None:
    data = jsonl(request("same"), request("other"), request("same"))

    error = only_error(data)

    assert (error.code, error.line, error.param) == ("duplicate_custom_id", 3, "custom_id")
    assert "'same'" in error.message and "line 1" in error.message


def test_a_custom_id_with_a_nul_fails_the_batch_with_its_line() -> None:
    # Kept as text, which PostgreSQL's cannot hold: storing the requests failed three times.
    error = only_error(jsonl(request("a"), request("b\x00")))

    assert (error.code, error.line, error.param) == ("invalid_value", 2, "custom_id")
    assert "NUL" in error.message


def test_method_other_than_post() -> None:
    error = only_error(jsonl(request("a", method="GET")))

    assert (error.code, error.line) == ("invalid_value", 1)
    assert error.message == "Invalid value: 'GET'. Supported values are: 'POST'."


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/embeddings/", "v1/embeddings"])
def test_url_not_matching_the_batch_endpoint(url: str) -> None:
    error = only_error(jsonl(request("a", url=url)))

    assert error == BatchFileError(
        code="invalid_url",
        message="The URL provided for this request does not match the batch endpoint.",
        line=1,
        param="url",
    )


def test_missing_model_fails_the_batch() -> None:
    error = only_error(jsonl(request("a", body={"input": "x"})))

    assert error == BatchFileError(
        code="invalid_request", message="Model parameter is required.", line=1, param="body.model"
    )


def test_model_of_wrong_type_fails_the_batch() -> None:
    error = only_error(jsonl(request("a", body={"model": 1, "input": "x"})))

    assert (error.code, error.param) == ("invalid_type", "body.model")


def test_unknown_model_fails_the_batch_as_openai_does() -> None:
    error = only_error(jsonl(request("a", body={"model": "text-embedding-3-large", "input": "x"})))

    assert error == BatchFileError(
        code="model_not_found",
        message="The provided model 'text-embedding-3-large' is not supported by the Batch API.",
        line=1,
        param="body.model",
    )


def test_too_many_requests() -> None:
    data = jsonl(request("a"), request("b"), request("c"))

    error = only_error(data, max_requests=2)

    assert error.code == "too_many_tasks"
    assert "3" in error.message and "2" in error.message


def test_too_many_inputs_across_the_batch() -> None:
    body = {"model": MODEL_ID, "input": ["x"] * 3}
    data = jsonl(request("a", body=body), request("b", body=body))

    assert parse_batch_input(data, ENDPOINT, max_inputs=6).requests
    error = only_error(data, max_inputs=5)

    assert error.code == "too_many_tasks"
    assert "6 inputs" in error.message


def test_every_bad_line_is_reported_with_its_own_line_number() -> None:
    missing_method = request("c")
    del missing_method["method"]
    data = jsonl(request("a"), "not json", missing_method, request("d", url="/v1/completions"))

    parsed = parse_batch_input(data, ENDPOINT)

    assert [(e.line, e.code) for e in parsed.errors] == [
        (2, "invalid_json_line"),
        (3, "missing_required_parameter"),
        (4, "invalid_url"),
    ]
    assert parsed.requests == []


def test_reported_errors_are_capped() -> None:
    data = jsonl(*(["{"] * (MAX_REPORTED_ERRORS + 50)))

    parsed = parse_batch_input(data, ENDPOINT)

    assert len(parsed.errors) == MAX_REPORTED_ERRORS
    assert parsed.errors[-1].line == MAX_REPORTED_ERRORS


def test_unsupported_batch_endpoint_is_a_400_invalid_value() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_batch_endpoint("/v1/responses")

    assert (caught.value.code, caught.value.param) == ("invalid_value", "endpoint")
    assert caught.value.message == (
        "Invalid value: '/v1/responses'. Supported values are: "
        "'/v1/embeddings', '/v1/chat/completions'."
    )
    assert validate_batch_endpoint(ENDPOINT) == ENDPOINT
    assert validate_batch_endpoint("/v1/chat/completions") == "/v1/chat/completions"


def test_failed_batch_errors_validate_as_the_sdk_batch_errors_field() -> None:
    data = jsonl("{oops", request("a", url="/v1/responses"))
    parsed = parse_batch_input(data, ENDPOINT)

    batch = Batch.model_validate(
        {
            "id": "batch_abc",
            "object": "batch",
            "endpoint": ENDPOINT,
            "input_file_id": "file-abc",
            "completion_window": "24h",
            "status": "failed",
            "created_at": 1_700_000_000,
            "failed_at": 1_700_000_001,
            "errors": batch_errors_object(parsed.errors),
        }
    )

    assert batch.errors is not None and batch.errors.object == "list"
    assert batch.errors.data is not None
    assert [(e.code, e.line, e.param, e.message) for e in batch.errors.data] == [
        ("invalid_json_line", 1, None, "This line is not parseable as valid JSON."),
        (
            "invalid_url",
            2,
            "url",
            "The URL provided for this request does not match the batch endpoint.",
        ),
    ]


# --- text that is JSON but not Unicode -----------------------------------------------------------


def test_an_unpaired_surrogate_in_the_body_fails_only_its_request() -> None:
    parsed = parse_batch_input(
        jsonl(request("good"), request("bad", body={"model": MODEL_ID, "input": ["a", "\ud800"]})),
        ENDPOINT,
    )
    assert not parsed.failed
    good, bad = parsed.requests
    assert good.planned is not None and bad.planned is None and bad.error is not None
    error = bad.error.to_openai()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "input[1]")
    assert "not valid Unicode" in error["message"]
    error["message"].encode("utf-8")  # the message itself can be written anywhere


def test_an_unpaired_surrogate_outside_the_body_fails_the_batch_at_its_line() -> None:
    error = only_error(jsonl(request("ok"), request("b\udc00")))
    assert (error.code, error.line, error.param) == ("invalid_value", 2, "custom_id")
    error = only_error(jsonl(request(body={"model": "\ud800", "input": "x"})))
    assert (error.code, error.param) == ("invalid_value", "body.model")
    error.message.encode("utf-8")


# -- hostile lines (hypothesis) -------------------------------------------------------------------


def _line_fields(endpoint: str, custom_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_ID, "input": ["a parked car", "text"]}
    if endpoint == "/v1/chat/completions":
        body = {"model": SMOLLM2.id, "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


@pytest.mark.fuzz
@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/chat/completions"])
@fuzz_settings(60)
@given(data=st.data())
def test_any_input_file_ends_in_requests_or_errors_that_name_their_line(
    endpoint: str, data: st.DataObject
) -> None:
    lines = [
        data.draw(spoiled(_line_fields(endpoint, f"r{i}")), label=f"line {i + 1}")
        for i in range(data.draw(st.integers(1, 4), label="lines"))
    ]

    parsed = parse_batch_input(b"\n".join(lines), endpoint)

    if parsed.errors:
        assert parsed.requests == []
        for error in parsed.errors:
            assert error.code and error.message
            assert error.line is None or 1 <= error.line <= len(lines)
            json.dumps(error.to_openai(), ensure_ascii=False).encode()  # storable as it is
    for spec in parsed.requests:
        assert (spec.planned is None) != (spec.error is None)
        if spec.error is not None:
            assert 400 <= spec.error.http_status < 500 and spec.error.message
            json.dumps(spec.error.to_openai(), ensure_ascii=False).encode()
