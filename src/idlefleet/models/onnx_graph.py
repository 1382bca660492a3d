"""Writing ONNX graphs by hand: named nodes and initializers, each name used once."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GraphWriter"]


class GraphWriter:
    """Accumulates nodes and initializers with deterministic, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add a single-output node; its output tensor carries the node's name."""
        if name in self._names:
            raise ValueError(f"duplicate tensor {name!r}")
        self._names.add(name)
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name
