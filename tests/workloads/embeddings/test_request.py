"""Tests for validate_embedding_body: what it accepts, and the exact OpenAI error for refusals."""

from __future__ import annotations

from typing import Any

import pytest

from idlefleet.coordinator.errors import IdlefleetError, InvalidRequest, NotFound
from idlefleet.workloads.embeddings.request import (
    MAX_INPUTS_PER_REQUEST,
    MODEL_ID,
    EmbeddingJob,
    validate_embedding_body,
)

EMPTY_INPUT = (
    "'$.input' is invalid. Please check the API reference: "
    "https://platform.openai.com/docs/api-reference."
)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "input": "hello", **fields}


def refusal(payload: object) -> IdlefleetError:
    with pytest.raises(IdlefleetError) as caught:
        validate_embedding_body(payload)
    return caught.value


# --- accepted bodies -------------------------------------------------------------------------


def test_single_string_becomes_one_text_marked_single() -> None:
    job = validate_embedding_body(body(input="The food was delicious"))

    assert job == EmbeddingJob(
        model=MODEL_ID, texts=("The food was delicious",), encoding_format="float", single=True
    )


def test_list_of_strings_keeps_order_and_is_not_single() -> None:
    job = validate_embedding_body(body(input=["b", "a", "b"]))

    assert job.texts == ("b", "a", "b")
    assert job.single is False


def test_alias_is_normalised_to_canonical_id() -> None:
    job = validate_embedding_body(body(model="sentence-transformers/all-MiniLM-L6-v2"))

    assert job.model == "all-MiniLM-L6-v2"


def test_encoding_format_defaults_to_float_and_accepts_base64() -> None:
    assert validate_embedding_body(body()).encoding_format == "float"
    assert validate_embedding_body(body(encoding_format=None)).encoding_format == "float"
    assert validate_embedding_body(body(encoding_format="base64")).encoding_format == "base64"


def test_native_dimensions_and_user_are_accepted() -> None:
    job = validate_embedding_body(body(dimensions=384, user="user-1234"))

    assert job.texts == ("hello",)


def test_exactly_max_inputs_is_accepted() -> None:
    job = validate_embedding_body(body(input=["x"] * MAX_INPUTS_PER_REQUEST))

    assert len(job.texts) == 2048


def test_whitespace_only_string_is_valid_text() -> None:
    assert validate_embedding_body(body(input=[" ", "a"])).texts == (" ", "a")


def test_job_is_immutable() -> None:
    job = validate_embedding_body(body())

    with pytest.raises(AttributeError):
        job.model = "other"  # type: ignore[misc]


# --- refusals ----------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found_with_openai_message() -> None:
    error = refusal(body(model="text-embedding-3-small"))

    assert isinstance(error, NotFound)
    assert error.http_status == 404
    assert error.to_openai() == {
        "error": {
            "message": "The model `text-embedding-3-small` does not exist or you do not have "
            "access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize("payload", [{"input": "x"}, {"input": "x", "model": None}])
def test_missing_model(payload: dict[str, Any]) -> None:
    error = refusal(payload)

    assert isinstance(error, InvalidRequest)
    assert (error.code, error.param) == ("missing_required_parameter", "model")
    assert error.message == "Missing required parameter: 'model'."


def test_model_of_wrong_type() -> None:
    error = refusal(body(model=3))

    assert (error.http_status, error.code, error.param) == (400, "invalid_type", "model")
    assert (
        error.message == "Invalid type for 'model': expected a string, but got an integer instead."
    )


@pytest.mark.parametrize("payload", [{"model": MODEL_ID}, {"model": MODEL_ID, "input": None}])
def test_missing_input(payload: dict[str, Any]) -> None:
    error = refusal(payload)

    assert (error.http_status, error.code, error.param) == (
        400,
        "missing_required_parameter",
        "input",
    )


@pytest.mark.parametrize("empty", ["", [], ["a", ""]], ids=["string", "list", "string-in-list"])
def test_empty_input_gets_openais_exact_error(empty: object) -> None:
    error = refusal(body(input=empty))

    assert error.to_openai() == {
        "error": {
            "message": EMPTY_INPUT,
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert error.http_status == 400


@pytest.mark.parametrize("tokens", [[101, 7592, 102], [[101, 102], [7592]]], ids=["flat", "nested"])
def test_token_arrays_are_refused_with_a_reason(tokens: object) -> None:
    error = refusal(body(input=tokens))

    assert (error.http_status, error.code, error.param) == (400, "unsupported_value", "input")
    assert "tokenizer" in error.message
    assert "string" in error.message


@pytest.mark.parametrize(
    ("value", "kind"), [(7, "an integer"), ({"text": "x"}, "an object"), (1.5, "a decimal")]
)
def test_input_of_wrong_type(value: object, kind: str) -> None:
    error = refusal(body(input=value))

    assert (error.http_status, error.code, error.param) == (400, "invalid_type", "input")
    assert error.message == (
        f"Invalid type for 'input': expected a string or an array of strings, but got {kind} "
        "instead."
    )


def test_mixed_list_names_the_bad_element() -> None:
    error = refusal(body(input=["fine", 12, "also fine"]))

    assert (error.code, error.param) == ("invalid_type", "input[1]")
    assert error.message == (
        "Invalid type for 'input[1]': expected a string, but got an integer instead."
    )


def test_more_than_2048_inputs() -> None:
    error = refusal(body(input=["x"] * 2049))

    assert (error.http_status, error.code, error.param) == (400, "array_above_max_length", "input")
    assert "2048" in error.message and "2049" in error.message


def test_bad_encoding_format_value() -> None:
    error = refusal(body(encoding_format="md5"))

    assert (error.code, error.param) == ("invalid_value", "encoding_format")
    assert error.message == "Invalid value: 'md5'. Supported values are: 'float' and 'base64'."


def test_bad_encoding_format_type() -> None:
    error = refusal(body(encoding_format=["float"]))

    assert (error.code, error.param) == ("invalid_type", "encoding_format")


@pytest.mark.parametrize("dims", [256, 1536, 0])
def test_dimensions_other_than_384(dims: int) -> None:
    error = refusal(body(dimensions=dims))

    assert (error.http_status, error.code, error.param) == (400, "unsupported_value", "dimensions")
    assert "384" in error.message


@pytest.mark.parametrize("dims", ["384", True, 384.0])
def test_dimensions_must_be_an_integer(dims: object) -> None:
    error = refusal(body(dimensions=dims))

    assert (error.code, error.param) == ("invalid_type", "dimensions")


def test_one_unknown_field() -> None:
    error = refusal(body(stream=True))

    assert error.to_openai()["error"] == {
        "message": "Unrecognized request argument supplied: stream",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_several_unknown_fields_are_listed_sorted() -> None:
    error = refusal(body(truncate="END", input_type="query"))

    assert error.message == "Unrecognized request arguments supplied: input_type, truncate"


def test_user_must_be_a_string() -> None:
    error = refusal(body(user=42))

    assert (error.code, error.param) == ("invalid_type", "user")


@pytest.mark.parametrize("payload", [["input"], "input", None])
def test_body_must_be_an_object(payload: object) -> None:
    error = refusal(payload)

    assert (error.http_status, error.code) == (400, "invalid_type")


def test_a_request_whose_text_would_not_fit_a_message_is_refused_before_it_runs() -> None:
    from idlefleet.workloads.embeddings.request import MAX_REQUEST_INPUT_BYTES

    fits = ["é" * (MAX_REQUEST_INPUT_BYTES // 4)] * 2  # 2 bytes a character: exactly the bound
    validate_embedding_body({"model": MODEL_ID, "input": fits})
    with pytest.raises(InvalidRequest) as caught:
        validate_embedding_body({"model": MODEL_ID, "input": [*fits, "one more"]})
    assert caught.value.code == "input_too_large" and caught.value.param == "input"
    with pytest.raises(InvalidRequest):
        validate_embedding_body({"model": MODEL_ID, "input": "x" * (MAX_REQUEST_INPUT_BYTES + 1)})
