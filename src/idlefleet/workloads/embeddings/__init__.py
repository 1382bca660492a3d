"""Sentence embeddings (``/v1/embeddings``): the first workload.

- request: an OpenAI embeddings body (``request.validate_embedding_body``, the same for online
  requests and batch lines); payload: the list of input texts; options: the
  ``encoding_format`` (``float`` | ``base64``), which only rendering needs.
- result: one little-endian float32 row of the model's dimension per input, concatenated; the
  tokens the inputs consumed.
- check, before a commit: one row per input, whole rows, no more tokens than the inputs can
  have (the model reads at most ``max_tokens`` of each), every row finite and of unit length.
- verification: a probe is a finished request re-run whole on another car; agreement is the
  cosine of every pair of rows (tighter within a hardware class than across).
- render: ``render.py``; the car's side: ``runner.py``.
- cost: inputs, UTF-8 bytes, tokens at most (the model truncates each input at ``max_tokens``),
  and characters as the compute estimate (units lease the longest requests first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idlefleet.models.catalog import MINILM, MODELS, ModelInfo
from idlefleet.workloads.base import Cost, Planned, Probe, UnitRunner, Workload
from idlefleet.workloads.embeddings.render import embedding_bodies_json, embedding_response
from idlefleet.workloads.embeddings.request import (
    MAX_BATCH_INPUTS,
    EmbeddingJob,
    canonical_model,
    validate_embedding_body,
)

if TYPE_CHECKING:
    from idlefleet.coordinator.store.base import StoredRequest

__all__ = ["EMBEDDINGS", "EmbeddingsWorkload"]

SAME_CLASS_MIN_COSINE = 0.99999
"""Two cars of one hardware class agree on an input's vector if their cosine is at least this
(1 - cosine at most 1e-5). Calibrated by ``scripts/calibrate_verification.py`` (onnxruntime
1.32.0, CPU, 1,000 texts of 2-256 tokens from the repository): an input embedded in a padded
batch of 32 on two threads against alone on one thread, 1 - cosine at most 5.4e-14; against
the unfused graph (other kernels), 6.3e-13. Not bit-for-bit all the same: other CPUs' kernels
sum in other orders, and a GPU class re-rounds at every operator (float16 emulated: 2.2e-6, a
margin of 4.5x). Cheats that save compute are at cosine 0.71 or less (below); one of 384
components replaced by a random value passes 4.1% of the time."""
CROSS_CLASS_MIN_COSINE = 0.999
"""Two cars of different hardware classes agree if their cosine is at least this (1 - cosine
at most 1e-3). Calibrated as above, 1 - cosine at most: fp16 weights (``--precision fp16``)
1.0e-6; emulated float16 activations 2.2e-6, bfloat16 activations 1.6e-4 (a margin of 6x).
Cheats, cosine at most: MiniLM's first 3 layers only 0.61, another input's vector 0.71, a
random unit vector 0.14, the first 352 or 192 components zero-padded 0.98 or 0.78, 16
components replaced 0.988 (4 replaced pass 1.5%, one 48%: a change that small is the
tolerance's floor, ||delta|| < 0.045, and saves the car nothing)."""


class EmbeddingsWorkload(Workload):
    kind = "embeddings"
    endpoint = "/v1/embeddings"
    max_batch_inputs = MAX_BATCH_INPUTS

    def canonical_model(self, name: str) -> str | None:
        return canonical_model(name)

    def models(self) -> tuple[str, ...]:
        return (MINILM.id,)

    def plan(self, body: object) -> Planned:
        job = validate_embedding_body(body)
        return Planned(
            model=job.model,
            payload=list(job.texts),
            options=job.encoding_format,
            cost=_cost(job, MODELS[job.model]),
            job=job,
        )

    # -- results -------------------------------------------------------------------------------
    def expectation(self, payload: Any) -> int:
        """The number of inputs (one vector each)."""
        return len(payload)

    def check(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        tokens: Sequence[int],
        data: bytes,
    ) -> str | None:
        info = MODELS.get(model)
        if info is None:
            return f"model {model} is not an embeddings model"
        row = 4 * info.dim
        for seq, inputs, size, used in zip(seqs, expected, sizes, tokens, strict=True):
            if size % row:
                return (
                    f"request {seq}: {size} bytes are not whole float32 vectors of dimension "
                    f"{info.dim} (model {model})"
                )
            if inputs is None:
                continue
            if size // row != inputs:
                return (
                    f"request {seq} has {inputs} input(s), the results have {size // row} vector(s)"
                )
            if used > inputs * info.max_tokens:
                return (
                    f"request {seq} reports {used} tokens; its {inputs} input(s) can have at "
                    f"most {info.max_tokens} each"
                )
        if not data:
            return None
        return _check_vectors(np.frombuffer(data, dtype="<f4").reshape(-1, info.dim))

    # -- verification --------------------------------------------------------------------------
    def work(self, payload: Any, result: bytes) -> int:
        """Inputs embedded."""
        return len(payload) if isinstance(payload, list) else 0

    def probe(self, payload: Any, result: bytes, pick: int) -> Probe:
        """The whole request, re-run as it was: to the car that runs it, a probe is a request
        like the others of its unit (a one-input probe among many-input requests would stand
        out, and a car could answer it honestly and nothing else). ``pick`` is not needed."""
        texts = payload if isinstance(payload, list) else []
        row = len(result) // len(texts) if texts else 0
        if not row or row % 4 or len(result) != row * len(texts):
            raise ValueError("a probe needs a finished request with one row per input")
        return Probe(payload=list(texts), reference=result, work=len(texts))

    def agree(
        self, model: str, probe: Any, reference: bytes, answer: bytes, same_class: bool
    ) -> bool:
        info = MODELS.get(model)
        if info is None or len(reference) != len(answer) or len(answer) % (4 * info.dim):
            return False
        x = np.frombuffer(reference, dtype="<f4").reshape(-1, info.dim).astype(np.float64)
        y = np.frombuffer(answer, dtype="<f4").reshape(-1, info.dim).astype(np.float64)
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        if not len(x) or not (np.isfinite(norms).all() and (norms > 0).all()):
            return False
        cosines = np.einsum("ij,ij->i", x, y) / norms
        floor = SAME_CLASS_MIN_COSINE if same_class else CROSS_CLASS_MIN_COSINE
        return bool((cosines >= floor).all())

    # -- responses -----------------------------------------------------------------------------
    def render_batch(self, requests: Sequence[StoredRequest]) -> Mapping[int, bytes]:
        """Every stored vector of the block turned into its body in one numpy pass per
        dimension, which is most of the cost of finalising a batch."""
        bodies: dict[int, bytes] = {}
        by_dim: dict[int, list[StoredRequest]] = {}
        for req in requests:
            if req.state == "done" and req.result is not None and req.model in MODELS:
                by_dim.setdefault(MODELS[req.model].dim, []).append(req)
        for dim, group in by_dim.items():
            matrices = [np.frombuffer(r.result or b"", dtype="<f4").reshape(-1, dim) for r in group]
            rendered = embedding_bodies_json(
                [r.model for r in group],
                np.concatenate(matrices),
                [len(m) for m in matrices],
                [r.token_count or 0 for r in group],
                ["base64" if r.options == "base64" else "float" for r in group],
            )
            bodies.update((r.seq, body) for r, body in zip(group, rendered, strict=True))
        return bodies

    def render_online(self, planned: Planned, result: bytes, tokens: int) -> dict[str, Any]:
        job: EmbeddingJob = planned.job
        vectors = np.frombuffer(result, dtype="<f4").reshape(-1, MODELS[job.model].dim)
        return embedding_response(job.model, vectors, tokens, job.encoding_format)

    # -- the car -------------------------------------------------------------------------------
    def model_files(self, model: str) -> dict[str, Path]:
        from idlefleet.models.minilm import default_model_dir

        if model != MINILM.id:
            raise ValueError(f"no embeddings model {model}")
        folder = default_model_dir()
        return {name: folder / name for name in MINILM_FILES}

    def provision(self, model: str, cache_dir: Path, source: Path | None = None) -> None:
        from idlefleet.models.cache import ensure_minilm

        ensure_minilm(cache_dir, source)

    def runner(
        self, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        return self.runner_at("fp32", model, cache_dir, threads, source)

    def runner_at(
        self, precision: str, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        # Imported here: the coordinator never loads ONNX Runtime or a tokenizer.
        from idlefleet.agent.runtime import Embedder
        from idlefleet.workloads.embeddings.runner import EmbeddingRunner

        if model != MINILM.id:
            raise ValueError(f"no embeddings runner for model {model}")
        if precision not in MINILM.precisions:
            raise ValueError(f"model {model} has no {precision} graph")
        return EmbeddingRunner(
            Embedder.load(cache_dir, threads=threads, model_dir=source, precision=precision)
        )


MINILM_FILES = ("model.safetensors", "tokenizer.json", "config.json")
"""What the graph builder and the tokenizer read (``models.minilm``, ``agent.runtime``)."""


def _cost(job: EmbeddingJob, info: ModelInfo) -> Cost:
    characters = 0
    utf8 = 0
    tokens = 0
    for text in job.texts:
        n = len(text)
        characters += n
        # isascii is O(1) in CPython: only non-ASCII text is encoded to count its bytes.
        utf8 += n if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        # A word piece holds at least one character; [CLS] and [SEP] are added.
        tokens += min(n + 2, info.max_tokens)
    return Cost(inputs=len(job.texts), input_bytes=utf8, tokens=tokens, compute=characters)


def _check_vectors(vectors: np.ndarray) -> str | None:
    """Sanity checks on untrusted results (full verification comes with replication).

    One pass for the common case: every row's squared norm is within 2e-3 of 1, which also
    fails for a NaN or an infinity anywhere in the row; the reason is worked out only then.
    """
    squares = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    if (np.abs(squares - 1.0) <= 2e-3).all():
        return None
    if not np.isfinite(vectors).all():
        return "vectors contain NaN or infinity"
    return "vectors must be L2-normalised"


EMBEDDINGS = EmbeddingsWorkload()
