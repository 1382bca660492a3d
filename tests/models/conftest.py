"""Fixtures for the model tests: the packaged MiniLM weights and the graph built from them once."""

from __future__ import annotations

from pathlib import Path

import pytest

from idlefleet.models.minilm import build_minilm_onnx, default_model_dir


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir: Path) -> bytes:
    # Built once per session: ~1 s and 90 MB, shared by every test that only reads it.
    return build_minilm_onnx(minilm_dir)
