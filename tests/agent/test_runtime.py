"""Tests for the agent's Embedder against sentence-transformers' reference vectors."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from idlefleet.agent.runtime import (
    RUNTIME,
    Embedder,
    EmbedResult,
    InferenceCancelled,
    load_tokenizer,
)
from idlefleet.models.cache import ensure_minilm
from idlefleet.models.minilm import EMBEDDING_DIM, MAX_SEQ_LENGTH, default_model_dir

MIN_COSINE = 0.99999


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _long_texts(n: int) -> list[str]:
    # ~400 words each, i.e. well past the 256-token limit, so every run is as slow as possible.
    return [f"text {i}: " + "the parked car charges its battery overnight " * 60 for i in range(n)]


def test_reference_file_covers_the_hard_cases(reference: dict[str, Any]) -> None:
    inputs: list[str] = reference["inputs"]

    assert reference["model"] == "all-MiniLM-L6-v2"
    assert len(inputs) >= 60
    assert len(reference["embeddings"]) == len(inputs)
    assert sum(n == MAX_SEQ_LENGTH for n in reference["token_counts"]) >= 3  # truncated inputs
    assert any(len(t.split()) > 400 for t in inputs)
    assert any(not t.isascii() for t in inputs)
    assert any(t != t.strip() and t.strip() for t in inputs)  # whitespace-padded text


def test_embeddings_match_sentence_transformers(
    embedder: Embedder, reference: dict[str, Any]
) -> None:
    expected = np.asarray(reference["embeddings"], dtype=np.float32)

    result = embedder.embed(reference["inputs"])

    assert result.vectors.shape == (len(reference["inputs"]), EMBEDDING_DIM)
    assert result.vectors.dtype == np.float32
    cosines = _cosines(result.vectors, expected)
    worst = int(np.argmin(cosines))
    print(f"min cosine vs reference: {cosines.min():.9f} ({reference['inputs'][worst][:40]!r})")
    assert cosines.min() >= MIN_COSINE, [
        (reference["inputs"][i][:40], float(cosines[i]))
        for i in np.flatnonzero(cosines < MIN_COSINE)
    ]
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_token_counts_match_sentence_transformers(
    embedder: Embedder, reference: dict[str, Any]
) -> None:
    result = embedder.embed(reference["inputs"])
    counted = embedder.count_tokens(reference["inputs"])

    assert result.token_counts == reference["token_counts"]
    assert counted == reference["token_counts"]
    assert max(counted) <= MAX_SEQ_LENGTH
    assert min(counted) >= 2  # [CLS] and [SEP] even for an empty string


def test_batching_does_not_change_vectors(embedder: Embedder, reference: dict[str, Any]) -> None:
    inputs: list[str] = reference["inputs"]

    together = embedder.embed(inputs).vectors
    one_by_one = np.stack([embedder.embed([t]).vectors[0] for t in inputs])

    assert _cosines(together, one_by_one).min() >= MIN_COSINE


def test_input_order_is_restored_across_micro_batches(model_cache_root: Path) -> None:
    # micro_batch=3 forces many batches, and lengths are deliberately interleaved so that
    # sorting by length reorders almost everything.
    small = Embedder.load(model_cache_root, micro_batch=3)
    texts = [
        ("word " * n).strip() + f" number {i}"
        for i, n in enumerate([40, 1, 25, 3, 200, 2, 60, 7, 0, 90, 5, 300, 12, 4])
    ]
    texts.insert(5, texts[1])  # the same text at two positions must give the same vector

    result = small.embed(texts)
    singles = np.stack([small.embed([t]).vectors[0] for t in texts])

    assert _cosines(result.vectors, singles).min() >= MIN_COSINE
    # Each row's nearest single-text vector is its own text (row 5 may match its twin, row 1).
    nearest = np.argmax(result.vectors @ singles.T, axis=1)
    assert [texts[j] for j in nearest] == texts
    np.testing.assert_allclose(result.vectors[5], result.vectors[1], atol=1e-6)
    assert result.token_counts == small.count_tokens(texts)
    assert result.token_counts[12] == MAX_SEQ_LENGTH  # the 300-word text is truncated


def test_tokenizer_as_shipped_is_refused(model_cache_root: Path) -> None:
    # The packaged tokenizer.json pads every input to a fixed 128 tokens (FIELD-NOTES): ~13x
    # slower, and it would silently cut long inputs at 128 instead of 256.
    sha, path = ensure_minilm(model_cache_root)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shipped = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    left_padded = load_tokenizer(default_model_dir())
    left_padded.enable_padding(pad_id=0, pad_token="[PAD]", direction="left")

    for tokenizer in (shipped, left_padded):
        with pytest.raises(ValueError, match="pad right to the longest"):
            Embedder(session, tokenizer, model_sha256=sha)


def test_empty_call_and_bare_string(embedder: Embedder) -> None:
    empty = embedder.embed([])

    assert isinstance(empty, EmbedResult)
    assert empty.vectors.shape == (0, EMBEDDING_DIM)
    assert empty.token_counts == []
    assert embedder.count_tokens([]) == []
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_two_threads_give_the_same_vectors(
    model_cache_root: Path, embedder: Embedder, reference: dict[str, Any]
) -> None:
    two = Embedder.load(model_cache_root, threads=2)

    assert two.model_sha256 == embedder.model_sha256
    assert (
        _cosines(
            two.embed(reference["inputs"]).vectors, embedder.embed(reference["inputs"]).vectors
        ).min()
        >= MIN_COSINE
    )


def test_terminate_before_the_call_cancels(embedder: Embedder) -> None:
    options = ort.RunOptions()
    options.terminate = True

    with pytest.raises(InferenceCancelled):
        embedder.embed(["never embedded"], run_options=options)


def test_terminate_from_another_thread_stops_a_long_call(embedder: Embedder) -> None:
    texts = _long_texts(2000)  # minutes of work on one thread if it were not cancelled
    options = ort.RunOptions()
    timer = threading.Timer(0.5, lambda: setattr(options, "terminate", True))

    started = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(InferenceCancelled):
            embedder.embed(texts, run_options=options)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - started

    assert elapsed < 10, f"cancellation took {elapsed:.1f} s"


def test_terminate_interrupts_a_running_micro_batch(model_cache_root: Path) -> None:
    # One micro-batch holding everything: cancellation can only come from inside ORT's run.
    single_batch = Embedder.load(model_cache_root, micro_batch=256, max_batch_tokens=10**6)
    texts = _long_texts(256)
    options = ort.RunOptions()
    timer = threading.Timer(0.2, lambda: setattr(options, "terminate", True))
    # The stop comes 0.2 s into ONNX Runtime's run, however long tokenising took before it (a
    # timer started with the call fired before the run began on a loaded machine).
    session = single_batch._session
    real_run = session.run

    def run_then_stop(*args: Any, **kwargs: Any) -> Any:
        timer.start()
        return real_run(*args, **kwargs)

    session.run = run_then_stop  # type: ignore[method-assign]
    started = time.perf_counter()
    try:
        with pytest.raises(InferenceCancelled) as excinfo:
            single_batch.embed(texts, run_options=options)
    finally:
        timer.cancel()
        session.run = real_run  # type: ignore[method-assign]
    elapsed = time.perf_counter() - started

    assert excinfo.value.__cause__ is not None  # translated from ONNX Runtime's own error
    assert elapsed < 10, f"cancellation took {elapsed:.1f} s"
    # The session survives a cancelled run.
    assert single_batch.embed(["still works"]).vectors.shape == (1, EMBEDDING_DIM)


def test_the_embedder_says_what_its_class_is_made_of(embedder: Embedder) -> None:
    assert RUNTIME.split() == ["onnxruntime", ort.__version__]
    assert embedder.provider == "CPUExecutionProvider"  # what the session runs on
    assert embedder.precision == "fp32"
