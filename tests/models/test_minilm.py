"""Tests for the torch-free MiniLM ONNX graph: validity, interface, determinism, ORT fusion;
its fp16 twin (a hardware class of its own) and the truncated cheat."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from idlefleet.models.minilm import (
    EMBEDDING_DIM,
    GRAPH_BUILDER_VERSION,
    MAX_SEQ_LENGTH,
    MODEL_ID,
    OPSET,
    PRECISIONS,
    BertConfig,
    build_minilm_onnx,
    build_truncated_minilm,
)


def _session(model: bytes, level: ort.GraphOptimizationLevel, **kw: object) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    for key, value in kw.items():
        setattr(options, key, value)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _feed(rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-pad token id rows with 0 ([PAD]) and build the matching attention mask."""
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# [CLS] ... [SEP] ids from the model vocabulary ("hello world", "the car is parked .", "a").
ROWS = [[101, 7592, 2088, 102], [101, 1996, 2482, 2003, 9083, 1012, 102], [101, 1037, 102]]


def test_constants() -> None:
    assert MODEL_ID == "all-MiniLM-L6-v2"
    assert EMBEDDING_DIM == 384
    assert MAX_SEQ_LENGTH == 256


def test_graph_passes_the_onnx_checker_with_shape_inference(minilm_onnx: bytes) -> None:
    model = onnx.load_from_string(minilm_onnx)

    onnx.checker.check_model(model, full_check=True)

    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    # Standard operators only: the file must load in any ONNX runtime, not just ORT.
    assert {n.domain for n in model.graph.node} == {""}


def test_interface(minilm_onnx: bytes) -> None:
    graph = onnx.load_from_string(minilm_onnx).graph

    def signature(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[object]]]:
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    assert signature(list(graph.input)) == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]),
        ("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"]),
    ]
    assert signature(list(graph.output)) == [
        ("sentence_embedding", onnx.TensorProto.FLOAT, ["batch", EMBEDDING_DIM]),
        ("token_embeddings", onnx.TensorProto.FLOAT, ["batch", "seq", EMBEDDING_DIM]),
    ]


def test_build_is_byte_for_byte_deterministic(minilm_dir: Path, minilm_onnx: bytes) -> None:
    again = build_minilm_onnx(minilm_dir)

    assert hashlib.sha256(again).hexdigest() == hashlib.sha256(minilm_onnx).hexdigest()
    assert again == minilm_onnx
    model = onnx.load_from_string(again)
    assert model.producer_version == str(GRAPH_BUILDER_VERSION)


def test_outputs_shapes_and_unit_norm(minilm_onnx: bytes) -> None:
    session = _session(minilm_onnx, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    sentence, tokens = session.run(["sentence_embedding", "token_embeddings"], _feed(ROWS))

    assert sentence.shape == (3, EMBEDDING_DIM) and sentence.dtype == np.float32
    assert tokens.shape == (3, 7, EMBEDDING_DIM) and tokens.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sentence, axis=1), 1.0, atol=1e-6)
    # Different sentences must not collapse onto one vector.
    assert float(sentence[0] @ sentence[1]) < 0.9


def test_padding_does_not_change_a_sentence(minilm_onnx: bytes) -> None:
    session = _session(minilm_onnx, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    (alone,) = session.run(["sentence_embedding"], _feed(ROWS[:1]))
    (padded,) = session.run(["sentence_embedding"], _feed(ROWS))  # row 0 padded from 4 to 7

    np.testing.assert_allclose(padded[0], alone[0], atol=1e-6)


def test_mean_pooling_and_normalisation_match_the_token_outputs(minilm_onnx: bytes) -> None:
    session = _session(minilm_onnx, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    feed = _feed(ROWS)

    sentence, tokens = session.run(["sentence_embedding", "token_embeddings"], feed)

    mask = feed["attention_mask"][..., None].astype(np.float32)
    mean = (tokens * mask).sum(axis=1) / mask.sum(axis=1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(sentence, expected, atol=1e-6)


def test_ort_enable_all_fuses_and_agrees_with_unoptimised(
    minilm_onnx: bytes, tmp_path: Path
) -> None:
    optimised_file = tmp_path / "optimised.onnx"
    fused = _session(
        minilm_onnx,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        optimized_model_filepath=str(optimised_file),
        # Saving an ENABLE_ALL graph logs a "hardware specific" warning; expected here.
        log_severity_level=3,
    )
    plain = _session(minilm_onnx, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)

    ops = Counter(n.op_type for n in onnx.load(str(optimised_file)).graph.node)
    (a,) = fused.run(["sentence_embedding"], _feed(ROWS))
    (b,) = plain.run(["sentence_embedding"], _feed(ROWS))

    # The graph is laid out so ORT recognises these patterns; losing them means the layout
    # drifted (e.g. GELU no longer in torch's export order).
    assert ops["BiasGelu"] == 6, ops
    assert ops["FusedMatMul"] == 6, ops  # Q @ K^T with the 1/sqrt(d) scale folded in
    assert ops["Erf"] == 0, ops
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_rejects_an_activation_we_do_not_build(minilm_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((minilm_dir / "config.json").read_text(encoding="utf-8"))
    raw["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(raw), encoding="utf-8")

    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_json(tmp_path / "config.json")


def _layer_norm_eps(model: onnx.ModelProto) -> set[float]:
    return {
        attr.f
        for node in model.graph.node
        if node.op_type == "LayerNormalization"
        for attr in node.attribute
        if attr.name == "epsilon"
    }


def test_builder_reads_layer_norm_eps_from_config(
    minilm_dir: Path, minilm_onnx: bytes, tmp_path: Path
) -> None:
    (tmp_path / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    shutil.copytree(minilm_dir / "1_Pooling", tmp_path / "1_Pooling")
    raw = json.loads((minilm_dir / "config.json").read_text(encoding="utf-8"))
    raw["layer_norm_eps"] = 1e-5
    (tmp_path / "config.json").write_text(json.dumps(raw), encoding="utf-8")

    changed = _layer_norm_eps(onnx.load_from_string(build_minilm_onnx(tmp_path)))
    shipped = _layer_norm_eps(onnx.load_from_string(minilm_onnx))

    assert len(changed) == 1 and changed.pop() == pytest.approx(1e-5)
    assert len(shipped) == 1 and shipped.pop() == pytest.approx(1e-12)  # all-MiniLM's config


@pytest.fixture(scope="module")
def minilm_fp16_onnx(minilm_dir: Path) -> bytes:
    return build_minilm_onnx(minilm_dir, "fp16")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.einsum("ij,ij->i", a64, b64) / (
        np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    )


def test_fp16_graph_stores_float16_weights_in_half_the_bytes(
    minilm_dir: Path, minilm_onnx: bytes, minilm_fp16_onnx: bytes
) -> None:
    model = onnx.load_from_string(minilm_fp16_onnx)
    onnx.checker.check_model(model, full_check=True)

    kinds = Counter(t.data_type for t in model.graph.initializer)
    # Every weight: 16 per layer, the two embedding tables and their LayerNorm's 2. Only the
    # builder's scalar constants stay float32 (the mask fill does not fit in float16).
    assert kinds[onnx.TensorProto.FLOAT16] == 6 * 16 + 4
    assert all(
        np.prod(t.dims) == 1
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )
    assert 0.49 < len(minilm_fp16_onnx) / len(minilm_onnx) < 0.51
    assert PRECISIONS == ("fp32", "fp16")
    assert build_minilm_onnx(minilm_dir, "fp16") == minilm_fp16_onnx  # deterministic too
    # Same interface as fp32: float32 in the session, whatever the weights are stored at.
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [
        onnx.TensorProto.FLOAT
    ] * 2
    with pytest.raises(ValueError, match="precision"):
        build_minilm_onnx(minilm_dir, "int8")


def test_fp16_graph_keeps_the_fusions_and_computes_in_float32(
    minilm_fp16_onnx: bytes, tmp_path: Path
) -> None:
    optimised_file = tmp_path / "optimised.onnx"
    _session(
        minilm_fp16_onnx,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        optimized_model_filepath=str(optimised_file),
        log_severity_level=3,
    )

    optimised = onnx.load(str(optimised_file))
    ops = Counter(n.op_type for n in optimised.graph.node)
    # ORT folds the casts: the session holds float32 weights and runs the fp32 kernels.
    assert ops["BiasGelu"] == 6 and ops["FusedMatMul"] == 6, ops
    assert onnx.TensorProto.FLOAT16 not in {t.data_type for t in optimised.graph.initializer}


def test_fp16_vectors_are_close_to_fp32_but_not_equal(
    minilm_onnx: bytes, minilm_fp16_onnx: bytes
) -> None:
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    (full,) = _session(minilm_onnx, level).run(["sentence_embedding"], _feed(ROWS))
    (half,) = _session(minilm_fp16_onnx, level).run(["sentence_embedding"], _feed(ROWS))

    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-6)
    cosines = _cosines(full, half)
    assert (cosines > 0.99999).all(), cosines  # a class apart, not another model
    assert not np.array_equal(full, half)
    assert (cosines < 1 - 1e-9).all(), cosines


def test_truncated_model_is_a_different_cheaper_model(minilm_dir: Path, minilm_onnx: bytes) -> None:
    cheat = build_truncated_minilm(minilm_dir, 3)

    model = onnx.load_from_string(cheat)
    onnx.checker.check_model(model, full_check=True)
    layers = {m[1] for n in model.graph.node if (m := re.match(r"encoder\.layer\.(\d+)", n.name))}
    assert layers == {"0", "1", "2"}
    assert model.doc_string.startswith("NOT ")
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    (honest,) = _session(minilm_onnx, level).run(["sentence_embedding"], _feed(ROWS))
    (cheap,) = _session(cheat, level).run(["sentence_embedding"], _feed(ROWS))
    np.testing.assert_allclose(np.linalg.norm(cheap, axis=1), 1.0, atol=1e-6)
    assert (_cosines(honest, cheap) < 0.9).all()  # calibrated: 0.61 at most on 1,000 texts
    for bad in (0, 6, 7):
        with pytest.raises(ValueError, match="layers"):
            build_truncated_minilm(minilm_dir, bad)
