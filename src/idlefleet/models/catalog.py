"""The models the fleet serves: ids, aliases and output shapes.

Vehicles run only models from this catalogue (ONNX graphs addressed by sha256), never
arbitrary code: all-MiniLM-L6-v2 sentence embeddings and the SmolLM2-135M-Instruct chat model.
Each entry names its workload (``kind``), which alone decides which endpoint may use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    id: str
    kind: str
    """The workload that serves it (``embeddings`` or ``chat``)."""
    dim: int
    """Output dimension of an embedding model (0 for a chat model)."""
    max_tokens: int
    """Tokens an embedding model reads of each input; a chat model's context window."""
    aliases: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32",)
    """The numeric precisions a car can run it at (``Hardware.precision``), its own first; each
    is a hardware class of its own, whose results verification compares at its own tolerance."""
    owned_by: str = "idlefleet"
    created: int = 1_700_000_000


MINILM = ModelInfo(
    id="all-MiniLM-L6-v2",
    kind="embeddings",
    dim=384,
    max_tokens=256,
    aliases=("sentence-transformers/all-MiniLM-L6-v2",),
    precisions=("fp32", "fp16"),  # fp16: float16 weights (models.minilm)
)

SMOLLM2 = ModelInfo(
    id="SmolLM2-135M-Instruct",
    kind="chat",
    dim=0,
    max_tokens=8192,
    aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
)

MODELS: dict[str, ModelInfo] = {MINILM.id: MINILM, SMOLLM2.id: SMOLLM2}


def resolve_model(name: str, kind: str | None = None) -> ModelInfo | None:
    """The catalogue entry for ``name`` (an id or an alias), of workload ``kind`` if given,
    or None."""
    found = MODELS.get(name) or next((m for m in MODELS.values() if name in m.aliases), None)
    if found is None or (kind is not None and found.kind != kind):
        return None
    return found
