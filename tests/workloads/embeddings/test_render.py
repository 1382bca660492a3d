"""Embeddings responses: float printing, the SDK's own types and decoding, batch bodies."""

from __future__ import annotations

import base64
import json

import httpx2
import numpy as np
import numpy.typing as npt
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse

from idlefleet.coordinator.errors import IdlefleetError
from idlefleet.workloads.embeddings.render import (
    embedding_bodies_json,
    embedding_response,
    shortest_float32,
)
from idlefleet.workloads.embeddings.request import MODEL_ID, validate_embedding_body


def unit_vectors(n: int, dims: int = 384, seed: int = 0) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def significant_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) or 1


# --- float formatting --------------------------------------------------------------------------


def test_float_json_round_trips_to_the_identical_float32() -> None:
    vectors = unit_vectors(50)

    text = json.dumps(embedding_response(MODEL_ID, vectors, 150, "float"))

    back = np.array([d["embedding"] for d in json.loads(text)["data"]], dtype=np.float32)
    assert back.dtype == np.float32
    assert np.array_equal(back, vectors)


def test_floats_print_as_the_shortest_float32_decimal() -> None:
    values = np.concatenate(
        [
            unit_vectors(20).ravel(),
            np.array([0.1, -0.5, 1.0, 3e-5, 1e-30, 7e12, 0.0, -0.0, 1.4e-45], dtype=np.float32),
        ]
    )

    printed = [repr(x) for x in shortest_float32(values).tolist()]

    assert repr(shortest_float32(np.array([0.1], dtype=np.float32)).tolist()[0]) == "0.1"
    for value, text in zip(values, printed, strict=True):
        assert np.float32(float(text)) == value
        # numpy's own shortest-unique float32 formatting is the reference for "shortest".
        reference = np.format_float_scientific(value, unique=True)
        assert significant_digits(text) <= significant_digits(reference), (value, text)


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1))
def test_any_finite_float32_prints_short_and_reads_back_identical(values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)

    printed = json.dumps(shortest_float32(array).tolist())

    back = np.array(json.loads(printed), dtype=np.float32)
    assert np.array_equal(back, array)
    assert np.array_equal(np.signbit(back), np.signbit(array))
    for value, text in zip(array, printed.strip("[]").split(", "), strict=True):
        reference = np.format_float_scientific(value, unique=True)
        assert significant_digits(text) <= significant_digits(reference), (value, text)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    vectors = unit_vectors(2)
    vectors[1, 5] = bad

    with pytest.raises(ValueError):
        embedding_response(MODEL_ID, vectors, 2, "float")
    with pytest.raises(ValueError):
        embedding_response(MODEL_ID, vectors, 2, "base64")


def test_vectors_must_be_a_matrix() -> None:
    with pytest.raises(ValueError, match="matrix"):
        embedding_response(MODEL_ID, unit_vectors(1)[0], 1, "float")


# --- embeddings response -----------------------------------------------------------------------


def test_float_response_validates_as_sdk_create_embedding_response() -> None:
    vectors = unit_vectors(3)

    body = embedding_response(MODEL_ID, vectors, 15, "float")
    parsed = CreateEmbeddingResponse.model_validate(json.loads(json.dumps(body)))

    assert parsed.object == "list" and parsed.model == MODEL_ID
    assert [d.index for d in parsed.data] == [0, 1, 2]
    assert all(d.object == "embedding" and len(d.embedding) == 384 for d in parsed.data)
    assert (parsed.usage.prompt_tokens, parsed.usage.total_tokens) == (15, 15)
    assert np.array_equal(np.array(parsed.data[2].embedding, dtype=np.float32), vectors[2])


def test_base64_is_little_endian_float32_as_the_sdk_decodes_it() -> None:
    vectors = unit_vectors(2)

    body = embedding_response(MODEL_ID, vectors, 2, "base64")

    for row, item in zip(vectors, body["data"], strict=True):
        raw = base64.b64decode(item["embedding"])
        assert len(raw) == 384 * 4
        assert np.array_equal(np.frombuffer(raw, dtype="<f4"), row)


def fake_embeddings_api(
    vectors_for: dict[str, npt.NDArray[np.float32]], *, strict: bool = False
) -> openai.OpenAI:
    """An SDK client whose HTTP calls are answered in-process by our validator and formatter."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        try:
            job = validate_embedding_body(json.loads(request.content))
        except IdlefleetError as error:
            return httpx2.Response(error.http_status, json=error.to_openai())
        vectors = np.stack([vectors_for[text] for text in job.texts])
        tokens = sum(len(text.split()) + 2 for text in job.texts)
        return httpx2.Response(
            200, json=embedding_response(job.model, vectors, tokens, job.encoding_format)
        )

    return openai.OpenAI(
        api_key="test",
        base_url="http://idlefleet.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
        # Strict: the SDK validates our body against its own types instead of trusting it.
        _strict_response_validation=strict,
    )


def test_sdk_default_base64_round_trip_gives_the_exact_vectors() -> None:
    vectors = unit_vectors(2, seed=7)
    client = fake_embeddings_api({"first text": vectors[0], "second": vectors[1]})

    # The SDK asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model=MODEL_ID, input=["first text", "second"])

    assert result.model == MODEL_ID
    assert result.usage.prompt_tokens == 4 + 3
    assert np.array_equal(np.array([d.embedding for d in result.data], dtype=np.float32), vectors)


def test_sdk_float_round_trip_under_strict_response_validation() -> None:
    vectors = unit_vectors(1, seed=8)
    client = fake_embeddings_api({"only": vectors[0]}, strict=True)

    result = client.embeddings.create(model=MODEL_ID, input="only", encoding_format="float")

    assert np.array_equal(np.array(result.data[0].embedding, dtype=np.float32), vectors[0])


def test_sdk_surfaces_our_errors_as_its_own_exceptions() -> None:
    client = fake_embeddings_api({})

    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model=MODEL_ID, input=[""])

    assert (missing.value.status_code, missing.value.code) == (404, "model_not_found")
    assert missing.value.type == "invalid_request_error"
    assert (empty.value.status_code, empty.value.code, empty.value.param) == (400, None, None)


# --- batch output and error lines --------------------------------------------------------------


@settings(max_examples=200)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64)
)
def test_batch_bodies_carry_exactly_the_float32_values_in_their_shortest_form(
    values: list[float],
) -> None:
    row = np.array(values, dtype=np.float32)
    (body,) = embedding_bodies_json([MODEL_ID], row[None, :], [1], [7], ["float"])

    printed = json.loads(body)["data"][0]["embedding"]
    assert np.array_equal(np.array(printed, dtype=np.float32), row)  # round-trips exactly
    assert printed == shortest_float32(row).tolist()  # the same shortest decimals, as numbers
    assert json.loads(body)["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_batch_bodies_refuse_non_finite_vectors() -> None:
    row = np.array([[0.5, np.nan]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or infinity"):
        embedding_bodies_json([MODEL_ID], row, [1], [1], ["float"])
