"""Tests for the torch-free MiniLM ONNX graph: validity, interface, determinism, ORT fusion."""

from __future__ import annotations

import hashlib
import json
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
    BertConfig,
    build_minilm_onnx,
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
