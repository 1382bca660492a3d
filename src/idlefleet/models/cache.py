"""Content-addressed store of ONNX model files, and the entry points that provision models.

A graph file is named by the sha256 of its bytes, so a file damaged on disk is detected on load
rather than producing wrong vectors. Writes go through a temporary file and an atomic rename, so
a crash or a concurrent writer never leaves a half-written model under a valid name.
`ensure_minilm` and `ensure_llama` keep a small index from "<model id>@<weights sha256>" (and,
for a MiniLM graph of other than fp32 weights, "+<precision>") to the graph's sha256 so that an
agent builds a graph from its weights (a signed release's files, see
`idlefleet.models.distribution`, or the packaged ones) once and then reuses the cached file on
every start. Work grants pin the signed release, whose weights fix the graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from idlefleet.models import minilm

__all__ = [
    "ModelCache",
    "ModelCacheError",
    "ModelIntegrityError",
    "ModelNotCachedError",
    "atomic_write",
    "ensure_graph",
    "ensure_llama",
    "ensure_minilm",
    "file_sha256",
]

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INDEX_NAME = "index.json"
_CHUNK = 1 << 20


class ModelCacheError(Exception):
    """Base class for model cache failures."""


class ModelNotCachedError(ModelCacheError):
    """No file with the requested sha256 is in the cache."""


class ModelIntegrityError(ModelCacheError):
    """A cached file's bytes no longer hash to the name it is stored under."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"model file {path} is corrupt: expected sha256 {expected}, contents hash to {actual}"
        )
        self.path = path
        self.expected = expected
        self.actual = actual


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, streamed so large weight files are never held in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file, fsync and a rename: a crash or a
    concurrent writer never leaves a half-written file under the name."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # fsync before rename: otherwise a power cut can leave the new name pointing at an
            # empty file, which a car losing 12 V power is rather likely to do.
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelCache:
    """A directory of `<sha256>.onnx` files whose names are the sha256 of their contents."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        """Where the file for `sha` lives (whether or not it exists)."""
        # Validating the name also keeps a hostile sha like "../x" from escaping the cache.
        if not _SHA256_HEX.fullmatch(sha):
            raise ValueError(f"not a lowercase sha256 hex digest: {sha!r}")
        return self.root / f"{sha}.onnx"

    def __contains__(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put(self, data: bytes) -> str:
        """Store `data` and return its sha256; a no-op if an intact copy is already stored."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.is_file() and target.stat().st_size == len(data) and file_sha256(target) == sha:
            return sha
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
        return sha

    def get(self, sha: str) -> bytes:
        """The stored bytes for `sha`, re-hashed so corruption raises `ModelIntegrityError`."""
        target = self.path(sha)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise ModelNotCachedError(f"no cached model {sha} in {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise ModelIntegrityError(target, sha, actual)
        return data

    def verify(self, sha: str) -> Path:
        """Check the stored file for `sha` without loading it; return its path."""
        target = self.path(sha)
        if not target.is_file():
            raise ModelNotCachedError(f"no cached model {sha} in {self.root}")
        actual = file_sha256(target)
        if actual != sha:
            raise ModelIntegrityError(target, sha, actual)
        return target

    # The index maps a build recipe to the graph it produced. Losing an update to a concurrent
    # writer only costs one rebuild, so plain atomic replace (no locking) is enough.
    def _read_index(self) -> dict[str, dict[str, object]]:
        try:
            raw = json.loads((self.root / _INDEX_NAME).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def lookup(self, key: str) -> dict[str, object] | None:
        """The index entry recorded for `key`, if any."""
        entry = self._read_index().get(key)
        return entry if isinstance(entry, dict) else None

    def record(self, key: str, entry: dict[str, object]) -> None:
        """Record (or replace) the index entry for `key`."""
        index = self._read_index()
        index[key] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        data = json.dumps(index, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        atomic_write(self.root / _INDEX_NAME, data)


def ensure_minilm(
    cache_root: Path, model_dir: Path | None = None, precision: str = "fp32"
) -> tuple[str, Path]:
    """Return (graph sha256, path) of the MiniLM ONNX graph with its weights at ``precision``
    (``minilm.PRECISIONS``), building it only if needed.

    The graph is rebuilt when the weights change, when the builder version changes, or when the
    cached file is missing or corrupt; otherwise the cached file is verified and reused. The
    graphs of both precisions have keys of their own, so both can be in one cache.
    """
    if precision not in minilm.PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(minilm.PRECISIONS)}")
    model_dir = minilm.default_model_dir() if model_dir is None else Path(model_dir)
    return ensure_graph(
        cache_root,
        # The config shapes the graph as much as the weights do (a signed release pins both).
        # fp32 keeps the key it had before there were precisions, so no cache is rebuilt.
        f"{minilm.MODEL_ID}@{file_sha256(model_dir / 'model.safetensors')}"
        f"+{file_sha256(model_dir / 'config.json')[:16]}"
        + ("" if precision == "fp32" else f"+{precision}"),
        minilm.GRAPH_BUILDER_VERSION,
        lambda: minilm.build_minilm_onnx(model_dir, precision),
    )


def ensure_llama(cache_root: Path, model_id: str, gguf_path: Path) -> tuple[str, Path]:
    """Return (graph sha256, path) of a llama GGUF's ONNX graph, building it only if needed
    (as :func:`ensure_minilm`: keyed by the GGUF's sha256 and the builder's version)."""
    from idlefleet.models import llama_onnx
    from idlefleet.models.gguf_llama import GGUFModel

    def build() -> bytes:
        model = GGUFModel(gguf_path)
        return llama_onnx.build_llama_model(model.config, model.weights()).SerializeToString()

    return ensure_graph(
        cache_root,
        f"{model_id}@{file_sha256(gguf_path)}",
        llama_onnx.GRAPH_BUILDER_VERSION,
        build,
    )


def ensure_graph(
    cache_root: Path, key: str, builder_version: int, build: Callable[[], bytes]
) -> tuple[str, Path]:
    """(sha256, path) of the graph recorded for ``key`` by this builder version, verified;
    built with ``build`` and recorded if there is none, or it is missing or corrupt."""
    cache = ModelCache(cache_root)
    entry = cache.lookup(key)
    if entry is not None and entry.get("builder_version") == builder_version:
        sha = str(entry.get("sha256"))
        try:
            return sha, cache.verify(sha)
        except ModelNotCachedError:
            log.warning("cached graph %s of %s is missing; rebuilding", sha, key)
        except (ModelIntegrityError, ValueError) as exc:
            log.warning("%s; rebuilding", exc)

    started = time.perf_counter()
    sha = cache.put(build())
    log.info("built the ONNX graph of %s: %s in %.2f s", key, sha, time.perf_counter() - started)
    cache.record(key, {"sha256": sha, "builder_version": builder_version})
    return sha, cache.path(sha)
