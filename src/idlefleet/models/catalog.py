"""The models the fleet serves: ids, aliases and output shapes.

Vehicles run only models from this catalogue (signed ONNX graphs addressed by sha256), never
arbitrary code. Today there is one: all-MiniLM-L6-v2 sentence embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    id: str
    dim: int
    max_tokens: int
    aliases: tuple[str, ...] = ()
    owned_by: str = "idlefleet"
    created: int = 1_700_000_000


MINILM = ModelInfo(
    id="all-MiniLM-L6-v2",
    dim=384,
    max_tokens=256,
    aliases=("sentence-transformers/all-MiniLM-L6-v2",),
)

MODELS: dict[str, ModelInfo] = {MINILM.id: MINILM}


def resolve_model(name: str) -> ModelInfo | None:
    """The catalogue entry for ``name`` (an id or an alias), or None."""
    if name in MODELS:
        return MODELS[name]
    for info in MODELS.values():
        if name in info.aliases:
            return info
    return None
