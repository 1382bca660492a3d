"""A llama model as an ONNX graph with a key/value cache, built from GGUF weights (no torch).

Inputs and outputs (B sequences, S new tokens each, P cached positions, T = P + S):

- ``input_ids`` int64 [B, S]; ``position_ids`` int64 [B, S] (each token's position in its
  sequence, for RoPE); ``attention_mask`` int64 [B, T] (1: a real cached or new token, 0: a
  slot's padding), so sequences of different lengths share one call; ``logits_from`` int64 [1]:
  the first new position whose logits are wanted (``S - 1``: the last only; 0: all);
- ``past_key.{i}`` / ``past_value.{i}`` float32 [B, kv_heads, P, head_dim] per layer (P may be 0);
- ``logits`` float32 [B, S - logits_from, vocab]; ``present_key.{i}`` / ``present_value.{i}``
  [B, kv_heads, T, head_dim]: the cache after this call (the past with the new tokens appended).

A query at cache index P + s sees key j if j ≤ P + s and ``attention_mask[b, j]`` is 1. Plain
opset-17 operators with float32 weights: this first graph is the reference for faster ones
(4-bit ``MatMulNBits``, ``GroupQueryAttention``), which must give the same tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from idlefleet.models.gguf_llama import LlamaConfig
from idlefleet.models.onnx_graph import GraphWriter

__all__ = ["GRAPH_BUILDER_VERSION", "build_llama_model", "cache_names", "prefill_feed"]

OPSET = 17
GRAPH_BUILDER_VERSION = 2
"""Bumped whenever the graph this module builds changes, so cached graphs are rebuilt."""


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The cache inputs and outputs, in graph order (key, value per layer)."""
    past = [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    return past, present


def prefill_feed(cfg: LlamaConfig, ids: list[int], logits_from: int) -> dict[str, np.ndarray]:
    """The inputs that run one sequence's tokens ``ids`` from an empty cache, with logits from
    position ``logits_from`` on (teacher forcing, reference checks)."""
    feed: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None, :],
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "logits_from": np.array([logits_from], dtype=np.int64),
    }
    empty = np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), dtype=np.float32)
    for name in cache_names(cfg.layers)[0]:
        feed[name] = empty
    return feed


def _ints(g: GraphWriter, name: str, values: list[int]) -> str:
    return g.const(name, np.array(values, dtype=np.int64))


def _rms_norm(g: GraphWriter, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    square = g.op("Mul", [x, x], f"{name}/square")
    mean = g.op("ReduceMean", [square], f"{name}/mean", axes=[-1], keepdims=1)
    eps_c = g.const(f"{name}.eps", np.array(eps, dtype=np.float32))
    inv = g.op(
        "Reciprocal",
        [g.op("Sqrt", [g.op("Add", [mean, eps_c], f"{name}/add")], f"{name}/sqrt")],
        f"{name}/inv",
    )
    return g.op("Mul", [g.op("Mul", [x, inv], f"{name}/scaled"), w], f"{name}/out")


def _linear(g: GraphWriter, x: str, weight: np.ndarray, name: str) -> str:
    """x @ weight.T (GGUF matrices are [out, in]; transposed once here)."""
    w = g.const(f"{name}.weight_t", np.ascontiguousarray(weight.T, dtype=np.float32))
    return g.op("MatMul", [x, w], f"{name}/matmul")


def _rope(g: GraphWriter, x: str, cos: str, sin: str, name: str) -> str:
    """Interleaved RoPE on x [B, heads, S, head_dim]: adjacent pairs rotated."""
    pairs = g.op("Reshape", [x, _ints(g, f"{name}.pairs", [0, 0, 0, -1, 2])], f"{name}/pairs")
    even = g.op("Gather", [pairs, _ints(g, f"{name}.i0", [0])], f"{name}/even", axis=4)
    odd = g.op("Gather", [pairs, _ints(g, f"{name}.i1", [1])], f"{name}/odd", axis=4)
    # even/odd: [B, H, S, half, 1]; cos/sin: [B, 1, S, half, 1]
    new_even = g.op(
        "Sub",
        [g.op("Mul", [even, cos], f"{name}/ec"), g.op("Mul", [odd, sin], f"{name}/os")],
        f"{name}/new_even",
    )
    new_odd = g.op(
        "Add",
        [g.op("Mul", [even, sin], f"{name}/es"), g.op("Mul", [odd, cos], f"{name}/oc")],
        f"{name}/new_odd",
    )
    joined = g.op("Concat", [new_even, new_odd], f"{name}/joined", axis=4)
    return g.op("Reshape", [joined, _ints(g, f"{name}.back", [0, 0, 0, -1])], f"{name}/out")


def build_llama_model(cfg: LlamaConfig, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The graph of ``cfg`` with ``weights`` (GGUF names, float32, [out, in])."""
    cfg.check()
    g = GraphWriter()
    hd, half = cfg.head_dim, cfg.head_dim // 2

    # -- positions, masks ----------------------------------------------------------------------
    past_len = g.op(
        "Gather",
        [g.op("Shape", ["past_key.0"], "past_shape"), _ints(g, "axis2", [2])],
        "past_len",
        axis=0,
    )  # [1]
    new_len = g.op(
        "Gather",
        [g.op("Shape", ["input_ids"], "ids_shape"), _ints(g, "axis1", [1])],
        "new_len",
        axis=0,
    )  # [1]
    total = g.op("Add", [past_len, new_len], "total_len")
    zero = g.const("zero", np.array(0, dtype=np.int64))
    one = g.const("one", np.array(1, dtype=np.int64))
    scalar = _ints(g, "scalar_shape", [])
    key_index = g.op(
        "Range", [zero, g.op("Reshape", [total, scalar], "total_scalar"), one], "key_index"
    )  # [T]
    query_index = g.op(
        "Add",
        [
            g.op(
                "Range", [zero, g.op("Reshape", [new_len, scalar], "new_scalar"), one], "new_index"
            ),
            past_len,
        ],
        "query_index",
    )  # [S]
    causal = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [key_index, _ints(g, "ax0", [0])], "key_row"),
            g.op("Unsqueeze", [query_index, _ints(g, "ax1", [1])], "query_col"),
        ],
        "causal",
    )  # [S, T]
    real = g.op(
        "Cast",
        [g.op("Unsqueeze", ["attention_mask", _ints(g, "ax12", [1, 2])], "mask_4d")],
        "mask_bool",
        to=TensorProto.BOOL,
    )  # [B, 1, 1, T]
    allowed = g.op("And", [causal, real], "allowed")  # [B, 1, S, T]
    mask_bias = g.op(
        "Where",
        [
            allowed,
            g.const("bias_open", np.array(0.0, dtype=np.float32)),
            g.const("bias_shut", np.array(-1e9, dtype=np.float32)),
        ],
        "mask_bias",
    )
    inv_freq = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2 / hd)
    angles = g.op(
        "Mul",
        [
            g.op(
                "Unsqueeze",
                [
                    g.op("Cast", ["position_ids"], "pos_f", to=TensorProto.FLOAT),
                    _ints(g, "ax_last", [-1]),
                ],
                "pos_col",
            ),
            g.const("inv_freq", inv_freq.astype(np.float32)),
        ],
        "angles",
    )  # [B, S, half]
    rope_axes = _ints(g, "rope_axes", [1, 4])  # [B, S, half] -> [B, 1, S, half, 1]
    cos = g.op("Unsqueeze", [g.op("Cos", [angles], "cos_raw"), rope_axes], "cos")
    sin = g.op("Unsqueeze", [g.op("Sin", [angles], "sin_raw"), rope_axes], "sin")

    # -- layers --------------------------------------------------------------------------------
    embedding = weights["token_embd.weight"].astype(np.float32)
    x = g.op("Gather", [g.const("token_embd", embedding), "input_ids"], "embed", axis=0)
    heads_shape = _ints(g, "q_heads", [0, 0, cfg.heads, hd])
    kv_shape = _ints(g, "kv_heads", [0, 0, cfg.kv_heads, hd])
    grouped = _ints(g, "grouped", [0, cfg.kv_heads, cfg.group, -1, hd])
    axis2 = _ints(g, "axis_group", [2])
    mask_bias5 = g.op("Unsqueeze", [mask_bias, axis2], "mask_bias/5d")  # [B, 1, 1, S, T]
    all_heads = _ints(g, "all_heads", [0, cfg.heads, -1, hd])
    merged = _ints(g, "merged", [0, 0, cfg.dim])
    scale = g.const("attn_scale", np.array(1 / np.sqrt(hd), dtype=np.float32))
    for i in range(cfg.layers):
        p, n = f"blk.{i}.", f"l{i}"
        h = _rms_norm(g, x, weights[p + "attn_norm.weight"], f"{n}.attn_norm", cfg.rms_eps)

        def heads(proj: str, shape: str, h: str = h, p: str = p, n: str = n) -> str:
            y = _linear(g, h, weights[p + f"attn_{proj}.weight"], f"{n}.{proj}")
            y = g.op("Reshape", [y, shape], f"{n}.{proj}/split")
            return g.op("Transpose", [y], f"{n}.{proj}/bhsd", perm=[0, 2, 1, 3])

        q = _rope(g, heads("q", heads_shape), cos, sin, f"{n}.q_rope")
        k = _rope(g, heads("k", kv_shape), cos, sin, f"{n}.k_rope")
        v = heads("v", kv_shape)
        k_all = g.op("Concat", [f"past_key.{i}", k], f"present_key.{i}", axis=2)
        v_all = g.op("Concat", [f"past_value.{i}", v], f"present_value.{i}", axis=2)

        # Grouped-query attention without copying the cache per query head: the query heads
        # of one key/value head are a dimension of their own, [B, kv, group, S, hd], against
        # the cache as [B, kv, 1, T, hd]; MatMul broadcasts over the group.
        q5 = g.op("Reshape", [q, grouped], f"{n}.q/groups")
        k5 = g.op("Unsqueeze", [k_all, axis2], f"{n}.k/5d")
        v5 = g.op("Unsqueeze", [v_all, axis2], f"{n}.v/5d")
        scores = g.op(
            "MatMul",
            [q5, g.op("Transpose", [k5], f"{n}.kT", perm=[0, 1, 2, 4, 3])],
            f"{n}.scores",
        )
        scores = g.op(
            "Add", [g.op("Mul", [scores, scale], f"{n}.scaled"), mask_bias5], f"{n}.masked"
        )
        attn = g.op("Softmax", [scores], f"{n}.attn", axis=-1)
        out = g.op("MatMul", [attn, v5], f"{n}.context/groups")
        out = g.op("Reshape", [out, all_heads], f"{n}.context")
        out = g.op("Transpose", [out], f"{n}.context/bshd", perm=[0, 2, 1, 3])
        out = g.op("Reshape", [out, merged], f"{n}.context/merged")
        x = g.op(
            "Add", [x, _linear(g, out, weights[p + "attn_output.weight"], f"{n}.o")], f"{n}.res1"
        )
        h = _rms_norm(g, x, weights[p + "ffn_norm.weight"], f"{n}.ffn_norm", cfg.rms_eps)
        gate = _linear(g, h, weights[p + "ffn_gate.weight"], f"{n}.gate")
        up = _linear(g, h, weights[p + "ffn_up.weight"], f"{n}.up")
        act = g.op(
            "Mul",
            [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{n}.sig")], f"{n}.silu"), up],
            f"{n}.swiglu",
        )
        x = g.op(
            "Add", [x, _linear(g, act, weights[p + "ffn_down.weight"], f"{n}.down")], f"{n}.res2"
        )

    x = _rms_norm(g, x, weights["output_norm.weight"], "output_norm", cfg.rms_eps)
    output = weights["token_embd.weight"] if cfg.tied_embeddings else weights["output.weight"]
    # Logits only from position ``logits_from`` on: generation needs the last one, and the
    # output projection of every prompt position (S x vocab x dim) was most of a prefill.
    x = g.op(
        "Slice",
        [x, "logits_from", _ints(g, "slice_end", [2**62]), _ints(g, "slice_axis", [1])],
        "from_position",
    )
    logits = _linear(g, x, output, "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    past, present = cache_names(cfg.layers)
    cache_type = [None, cfg.kv_heads, None, hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "new"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]),
        *(
            helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch", cache_type[1], "past", hd]
            )
            for name in past
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", cfg.vocab]),
        *(
            helper.make_tensor_value_info(
                name, TensorProto.FLOAT, ["batch", cache_type[1], "total", hd]
            )
            for name in present
        ),
    ]
    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model
