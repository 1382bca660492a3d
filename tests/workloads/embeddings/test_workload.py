"""The embeddings workload through its interface: plan, cost, check, verification (probe and
agree, with real vectors of both CPU hardware classes and of cheats), render."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from openai.types import CreateEmbeddingResponse

from idlefleet.coordinator.errors import InvalidRequest, NotFound
from idlefleet.coordinator.store.base import StoredRequest
from idlefleet.models.catalog import MINILM
from idlefleet.models.minilm import build_truncated_minilm, default_model_dir
from idlefleet.workloads import WORKLOADS, by_endpoint, for_model
from idlefleet.workloads.embeddings import EMBEDDINGS
from idlefleet.workloads.embeddings.runner import EmbeddingRunner

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


def test_probe_is_the_whole_request_judged_against_its_result() -> None:
    result = unit_rows(3).tobytes()

    probe = EMBEDDINGS.probe(["a", "b", "c"], result, pick=4)

    assert probe.payload == ["a", "b", "c"] and probe.reference == result
    assert probe.work == 3 == EMBEDDINGS.work(["a", "b", "c"], result)
    assert EMBEDDINGS.probe(["a", "b", "c"], result, pick=0) == probe
    for payload, data in ((["a", "b", "c"], result[:-4]), ([], b""), (["a"], b"")):
        with pytest.raises(ValueError):
            EMBEDDINGS.probe(payload, data, pick=0)


TEXTS = [
    "My car is parked in the garage and charging overnight.",
    "a",
    "Müller fährt über die Straße nach Köln.",
    "电动汽车在夜间充电。",
    "SELECT id, name FROM vehicles WHERE soc > 0.8 ORDER BY id;",
    "Electric vehicles spend most of their lives parked, often plugged into a charger long "
    "after the battery is full; their computers sit idle for hours every night. " * 4,
]


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EmbeddingRunner]:
    """The two classes a CPU car can be: fp32 and fp16 weights, from one cache."""
    cache = tmp_path_factory.mktemp("model-cache")
    runners = {p: EMBEDDINGS.runner_at(p, MINILM.id, cache, 1) for p in MINILM.precisions}
    assert all(isinstance(r, EmbeddingRunner) for r in runners.values())
    return runners  # type: ignore[return-value]


def answer(runner: EmbeddingRunner, payload: list[str], one_by_one: bool = False) -> bytes:
    """What a verifying car sends back for a probe: its rows (each text alone, or batched)."""
    batches = [[text] for text in payload] if one_by_one else [payload]
    embed = runner.embedder.embed
    return b"".join(embed(b).vectors.astype("<f4").tobytes() for b in batches)


def test_runners_report_their_provider_and_build_each_precision(
    classes: dict[str, EmbeddingRunner],
) -> None:
    assert {r.provider for r in classes.values()} == {"CPUExecutionProvider"}
    assert [r.embedder.precision for r in classes.values()] == ["fp32", "fp16"]
    assert classes["fp32"].embedder.model_sha256 != classes["fp16"].embedder.model_sha256
    with pytest.raises(ValueError, match="int8"):
        EMBEDDINGS.runner_at("int8", MINILM.id, Path("unused"), 1)


@pytest.mark.parametrize("car", ["fp32", "fp16"])
def test_agree_within_and_across_classes_with_real_vectors(
    classes: dict[str, EmbeddingRunner], car: str
) -> None:
    # The car embedded the request as one batch; the verifier runs it otherwise batched.
    result = answer(classes[car], TEXTS)
    probe = EMBEDDINGS.probe(TEXTS, result, pick=0)
    other = "fp16" if car == "fp32" else "fp32"

    same = answer(classes[car], probe.payload, one_by_one=True)
    across = answer(classes[other], probe.payload, one_by_one=True)

    assert EMBEDDINGS.agree(MINILM.id, probe.payload, probe.reference, same, same_class=True)
    assert EMBEDDINGS.agree(MINILM.id, probe.payload, probe.reference, across, same_class=False)
    assert across != probe.reference  # a class apart: close, not equal


def test_agree_refuses_cheats(classes: dict[str, EmbeddingRunner]) -> None:
    fp32 = classes["fp32"].embedder
    honest = fp32.embed(TEXTS).vectors.astype(np.float64)
    feed = fp32._encode(TEXTS)
    cheap_session = ort.InferenceSession(
        build_truncated_minilm(default_model_dir(), 3), providers=["CPUExecutionProvider"]
    )
    (three_layers,) = cheap_session.run(["sentence_embedding"], feed)
    rng = np.random.default_rng(13)
    replaced = honest.copy()
    for row in replaced:  # 16 of 384 components replaced by values of their typical size
        row[rng.choice(MINILM.dim, 16, replace=False)] = rng.normal(0, MINILM.dim**-0.5, 16)
    truncated = honest.copy()
    truncated[:, 192:] = 0
    cheats = {
        "first 3 of 6 layers": three_layers,
        "a random unit vector": unit_rows(len(TEXTS), 7),
        "another input's vector": np.roll(honest, 1, axis=0),
        "16 components replaced": replaced,
        "half the components, zero-padded": truncated,
    }

    reference = honest.astype("<f4").tobytes()
    for name, vectors in cheats.items():
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for i in range(len(TEXTS)):
            # One cheated row among honest ones is enough to refuse the request.
            answer = honest.copy()
            answer[i] = vectors[i]
            cheat = answer.astype("<f4").tobytes()
            for same_class in (True, False):
                agreed = EMBEDDINGS.agree(MINILM.id, TEXTS, reference, cheat, same_class)
                assert not agreed, (name, i, same_class)


def test_agree_refuses_answers_of_the_wrong_shape_or_values() -> None:
    a = unit_rows(1)
    reference = a.tobytes()
    zero = np.zeros_like(a)
    nan = a.copy()
    nan[0, 3] = np.nan

    assert EMBEDDINGS.agree(MINILM.id, ["x"], reference, reference, same_class=True)
    for bad in (a.tobytes()[:-4], unit_rows(2).tobytes(), zero.tobytes(), nan.tobytes(), b""):
        assert not EMBEDDINGS.agree(MINILM.id, ["x"], reference, bad, same_class=False)
    assert not EMBEDDINGS.agree("gpt-x", ["x"], reference, reference, same_class=True)


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
