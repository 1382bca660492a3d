"""Fixtures for the agent tests: one model cache and one loaded Embedder per session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from idlefleet.agent.runtime import Embedder

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


@pytest.fixture(scope="session")
def model_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def embedder(model_cache_root: Path) -> Embedder:
    return Embedder.load(model_cache_root, threads=1)


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    """sentence-transformers' vectors, written by scripts/make_reference.py."""
    return json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
