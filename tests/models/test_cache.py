"""Tests for the content-addressed model cache and MiniLM provisioning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from idlefleet.models import minilm
from idlefleet.models.cache import (
    ModelCache,
    ModelIntegrityError,
    ModelNotCachedError,
    ensure_minilm,
)


def test_put_names_the_file_by_its_sha256(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    data = b"an onnx graph, notionally"

    sha = cache.put(data)

    assert sha == hashlib.sha256(data).hexdigest()
    assert cache.path(sha) == tmp_path / "cache" / f"{sha}.onnx"
    assert cache.path(sha).read_bytes() == data
    assert cache.get(sha) == data
    assert sha in cache


def test_put_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)

    first = cache.put(b"same bytes")
    second = cache.put(b"same bytes")

    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first}.onnx"]


def test_corruption_is_detected(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    sha = cache.put(b"original model bytes")
    cache.path(sha).write_bytes(b"original model byteZ")

    with pytest.raises(ModelIntegrityError) as excinfo:
        cache.get(sha)
    with pytest.raises(ModelIntegrityError):
        cache.verify(sha)

    assert excinfo.value.expected == sha
    assert excinfo.value.actual == hashlib.sha256(b"original model byteZ").hexdigest()
    assert sha in str(excinfo.value)


def test_put_repairs_a_corrupt_copy(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    sha = cache.put(b"model")
    cache.path(sha).write_bytes(b"MODEL")

    assert cache.put(b"model") == sha

    assert cache.get(sha) == b"model"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    absent = hashlib.sha256(b"never stored").hexdigest()

    with pytest.raises(ModelNotCachedError, match=absent):
        cache.get(absent)
    assert absent not in cache


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 63, "F" * 64, ""])
def test_only_sha256_names_are_accepted(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        ModelCache(tmp_path).path(bad)


class CountingBuilder:
    """Stands in for the real graph builder so cache behaviour is tested in milliseconds."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model_dir: Path, precision: str = "fp32") -> bytes:
        self.calls += 1
        suffix = b"" if precision == "fp32" else b" at " + precision.encode()
        return b"graph built from " + (model_dir / "model.safetensors").read_bytes() + suffix


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> CountingBuilder:
    builder = CountingBuilder()
    monkeypatch.setattr(minilm, "build_minilm_onnx", builder)
    return builder


@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "weights"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights v1")
    (model_dir / "config.json").write_bytes(b"{}")
    return model_dir


def test_ensure_builds_once_then_reuses(
    tmp_path: Path, fake_builder: CountingBuilder, fake_model_dir: Path
) -> None:
    root = tmp_path / "cache"

    first = ensure_minilm(root, fake_model_dir)
    second = ensure_minilm(root, fake_model_dir)

    assert fake_builder.calls == 1
    assert first == second
    sha, path = first
    assert path.read_bytes() == b"graph built from weights v1"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    weights_sha = hashlib.sha256(b"weights v1").hexdigest()
    config_sha = hashlib.sha256(b"{}").hexdigest()[:16]
    index = json.loads((root / "index.json").read_text(encoding="utf-8"))
    assert index[f"all-MiniLM-L6-v2@{weights_sha}+{config_sha}"]["sha256"] == sha


def test_ensure_keeps_each_precision_under_a_key_of_its_own(
    tmp_path: Path, fake_builder: CountingBuilder, fake_model_dir: Path
) -> None:
    root = tmp_path / "cache"

    full = ensure_minilm(root, fake_model_dir)
    half = ensure_minilm(root, fake_model_dir, "fp16")

    assert full != half and fake_builder.calls == 2
    assert half[1].read_bytes() == b"graph built from weights v1 at fp16"
    # Both stay: neither start rebuilds the other's graph.
    assert ensure_minilm(root, fake_model_dir) == full
    assert ensure_minilm(root, fake_model_dir, "fp16") == half
    assert fake_builder.calls == 2
    keys = json.loads((root / "index.json").read_text(encoding="utf-8"))
    assert {k.endswith("+fp16") for k in keys} == {False, True}
    with pytest.raises(ValueError, match="precision"):
        ensure_minilm(root, fake_model_dir, "int8")


def test_ensure_rebuilds_a_corrupt_or_missing_graph(
    tmp_path: Path, fake_builder: CountingBuilder, fake_model_dir: Path
) -> None:
    root = tmp_path / "cache"
    sha, path = ensure_minilm(root, fake_model_dir)

    path.write_bytes(b"bit rot")
    assert ensure_minilm(root, fake_model_dir) == (sha, path)
    path.unlink()
    assert ensure_minilm(root, fake_model_dir) == (sha, path)

    assert fake_builder.calls == 3
    assert ModelCache(root).get(sha) == b"graph built from weights v1"


def test_ensure_rebuilds_when_weights_or_builder_change(
    tmp_path: Path,
    fake_builder: CountingBuilder,
    fake_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "cache"
    sha_v1, _ = ensure_minilm(root, fake_model_dir)

    (fake_model_dir / "model.safetensors").write_bytes(b"weights v2")
    sha_v2, _ = ensure_minilm(root, fake_model_dir)
    monkeypatch.setattr(minilm, "GRAPH_BUILDER_VERSION", minilm.GRAPH_BUILDER_VERSION + 1)
    ensure_minilm(root, fake_model_dir)

    assert sha_v1 != sha_v2
    assert fake_builder.calls == 3


def test_ensure_with_the_real_weights_caches_the_real_graph(
    tmp_path: Path, minilm_dir: Path, minilm_onnx: bytes
) -> None:
    sha, path = ensure_minilm(tmp_path / "cache", minilm_dir)

    assert sha == hashlib.sha256(minilm_onnx).hexdigest()
    assert path.stat().st_size == len(minilm_onnx)
    assert ensure_minilm(tmp_path / "cache", minilm_dir) == (sha, path)
