"""The embeddings workload through its interface: plan, cost, check, compare, render."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse

from idlefleet.coordinator.errors import InvalidRequest, NotFound
from idlefleet.coordinator.store.base import StoredRequest
from idlefleet.models.catalog import MINILM
from idlefleet.workloads import WORKLOADS, by_endpoint, for_model
from idlefleet.workloads.embeddings import EMBEDDINGS

ROW = 4 * MINILM.dim


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, MINILM.dim)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_registered_by_kind_endpoint_and_model() -> None:
    assert WORKLOADS["embeddings"] is EMBEDDINGS
    assert by_endpoint("/v1/embeddings") is EMBEDDINGS
    assert by_endpoint("/v1/chat/completions") is WORKLOADS["chat"]
    assert by_endpoint("/v1/responses") is None
    assert for_model(MINILM.id) is EMBEDDINGS
    assert for_model("SmolLM2-135M-Instruct") is WORKLOADS["chat"]
    # A model serves only its own workload's endpoint.
    assert EMBEDDINGS.canonical_model("SmolLM2-135M-Instruct") is None
    assert WORKLOADS["chat"].canonical_model(MINILM.id) is None
    assert WORKLOADS["chat"].canonical_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "SmolLM2-135M-Instruct"
    )
    assert for_model("sentence-transformers/all-MiniLM-L6-v2") is None  # aliases are resolved first


def test_plan_gives_payload_options_and_cost() -> None:
    planned = EMBEDDINGS.plan(
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "input": ["héllo", "a" * 2000],
            "encoding_format": "base64",
        }
    )

    assert planned.model == MINILM.id
    assert planned.payload == ["héllo", "a" * 2000]
    assert json.loads(json.dumps(planned.payload)) == planned.payload  # a JSON value
    assert planned.options == "base64"
    assert planned.cost.inputs == 2
    assert planned.cost.input_bytes == len("héllo".encode()) + 2000
    assert planned.cost.tokens == (5 + 2) + MINILM.max_tokens  # truncated at max_tokens
    assert planned.cost.compute == 5 + 2000


def test_plan_raises_openais_errors() -> None:
    with pytest.raises(InvalidRequest):
        EMBEDDINGS.plan({"model": MINILM.id, "input": ""})
    with pytest.raises(NotFound):
        EMBEDDINGS.plan({"model": "nope", "input": "x"})


def check(expected: list[int | None], rows: list[np.ndarray], tokens: list[int]) -> str | None:
    data = b"".join(r.astype("<f4").tobytes() for r in rows)
    return EMBEDDINGS.check(
        MINILM.id,
        list(range(len(rows))),
        expected,
        [r.size * 4 for r in rows],
        tokens,
        data,
    )


def test_check_accepts_one_unit_vector_per_input() -> None:
    assert check([2, 1], [unit_rows(2), unit_rows(1, 1)], [10, 3]) is None


def test_check_refuses_the_wrong_number_of_vectors() -> None:
    problem = check([2], [unit_rows(1)], [3])
    assert problem == "request 0 has 2 input(s), the results have 1 vector(s)"


def test_check_refuses_bytes_that_are_not_whole_vectors() -> None:
    data = unit_rows(1).tobytes()[:-4]
    problem = EMBEDDINGS.check(MINILM.id, [7], [1], [len(data)], [1], data)
    assert problem is not None and "request 7" in problem and "whole float32 vectors" in problem


def test_check_refuses_more_tokens_than_the_inputs_can_have() -> None:
    assert check([2], [unit_rows(2)], [2 * MINILM.max_tokens]) is None
    problem = check([2], [unit_rows(2)], [2 * MINILM.max_tokens + 1])
    assert problem is not None and "tokens" in problem


def test_check_refuses_non_finite_and_unnormalised_vectors() -> None:
    bad = unit_rows(2)
    bad[1, 3] = np.nan
    assert check([2], [bad], [4]) == "vectors contain NaN or infinity"
    assert check([1], [unit_rows(1) * 2], [4]) == "vectors must be L2-normalised"


def test_check_leaves_unknown_requests_to_the_commit_but_still_checks_their_rows() -> None:
    assert check([None], [unit_rows(3)], [4]) is None
    assert check([None], [unit_rows(3) * 0.5], [4]) == "vectors must be L2-normalised"


def test_check_refuses_a_model_that_is_not_an_embeddings_model() -> None:
    data = unit_rows(1).tobytes()
    assert EMBEDDINGS.check("gpt-x", [0], [1], [ROW], [1], data) is not None


def test_compare_accepts_rounding_noise_and_refuses_other_vectors() -> None:
    a = unit_rows(4)
    noisy = a + np.float32(1e-5) * unit_rows(4, 9)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    assert EMBEDDINGS.compare(MINILM.id, a.tobytes(), a.tobytes())
    assert EMBEDDINGS.compare(MINILM.id, a.tobytes(), noisy.astype("<f4").tobytes())
    other = a.copy()
    other[2] = unit_rows(1, 5)[0]
    assert not EMBEDDINGS.compare(MINILM.id, a.tobytes(), other.tobytes())
    assert not EMBEDDINGS.compare(MINILM.id, a.tobytes(), a[:3].tobytes())
    zero = a.copy()
    zero[0] = 0
    assert not EMBEDDINGS.compare(MINILM.id, a.tobytes(), zero.tobytes())


def stored(
    seq: int, rows: np.ndarray | None, options: str = "float", **kw: object
) -> StoredRequest:
    fields: dict[str, object] = {
        "seq": seq,
        "custom_id": f"r{seq}",
        "state": "done" if rows is not None else "failed",
        "options": options,
        "model": MINILM.id,
        "result": None if rows is None else rows.astype("<f4").tobytes(),
        "token_count": None if rows is None else 3 * len(rows),
        "error_status": None,
        "error_body": None,
    }
    fields.update(kw)
    return StoredRequest(**fields)  # type: ignore[arg-type]


def test_render_batch_renders_every_finished_request_and_nothing_else() -> None:
    a, b = unit_rows(2, 1), unit_rows(1, 2)
    bodies = EMBEDDINGS.render_batch(
        [stored(0, a), stored(1, None), stored(2, b, "base64"), stored(3, a, state="pending")]
    )

    assert set(bodies) == {0, 2}
    first = CreateEmbeddingResponse.model_validate_json(bodies[0])
    assert np.array_equal(np.array([d.embedding for d in first.data], dtype=np.float32), a)
    assert first.usage.prompt_tokens == 6
    second = json.loads(bodies[2])
    raw = base64.b64decode(second["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype="<f4"), b[0])


def test_render_online_gives_the_sdk_shape_with_the_total_tokens() -> None:
    planned = EMBEDDINGS.plan({"model": MINILM.id, "input": ["a", "b"]})
    rows = unit_rows(2)

    response = EMBEDDINGS.render_online(planned, rows.tobytes(), 9)

    parsed = CreateEmbeddingResponse.model_validate(response)
    assert parsed.usage.total_tokens == 9 and len(parsed.data) == 2
    assert np.array_equal(np.array(parsed.data[1].embedding, dtype=np.float32), rows[1])
