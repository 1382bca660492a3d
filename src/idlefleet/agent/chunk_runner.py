"""Run one chunk of a unit through the compute gate: the agent's only path to the model.

`run_chunk` asks the gate for a step, embeds the chunk's texts with the step's run options and
meters the step, all on the calling (compute) thread. If the gate stops the step mid-run, the
texts whose micro-batches finished are kept: the caller submits the requests whose every text
is done and gives back the rest. The agent (through ``EmbeddingRunner``, in
``idlefleet.workloads.embeddings.runner``) and ``bench/preemption.py`` both call this, so the
benchmark measures the agent's own stop path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.runtime import Embedder, InferenceCancelled

__all__ = [
    "RESULT_CHUNK_BYTES",
    "ChunkOutcome",
    "plan_chunks",
    "run_chunk",
    "vectors_per_chunk",
]

RESULT_CHUNK_BYTES = 2 * 1024 * 1024
"""A result chunk's vectors at most this many bytes on the wire (base64), so that each chunk
is one NATS message with room to spare; a request whose vectors alone are more (2048 inputs of
384 dimensions: ~4 MiB) is a chunk of its own, still inside the 8 MiB message."""


def plan_chunks(
    order: Sequence[int], inputs: Sequence[int], max_requests: int, max_vectors: int
) -> list[list[int]]:
    """Cut a unit's items (indices, in ``order``) into chunks of at most ``max_requests``
    items and ``max_vectors`` inputs (``inputs[i]`` each); an item with more inputs than
    that is a chunk alone. Every item is in exactly one chunk, in order."""
    chunks: list[list[int]] = []
    current: list[int] = []
    vectors = 0
    for i in order:
        if current and (len(current) >= max_requests or vectors + inputs[i] > max_vectors):
            chunks.append(current)
            current, vectors = [], 0
        current.append(i)
        vectors += inputs[i]
    if current:
        chunks.append(current)
    return chunks


def vectors_per_chunk(dim: int) -> int:
    """How many vectors of ``dim`` float32 fit in ``RESULT_CHUNK_BYTES`` as base64."""
    return max(1, RESULT_CHUNK_BYTES * 3 // (4 * 4 * dim))


@dataclass(frozen=True)
class ChunkOutcome:
    """What became of a chunk: all done, partly done before a stop, or refused at the start."""

    vectors: np.ndarray
    """float32 rows per text; only rows with ``done`` set are valid."""
    done: np.ndarray
    """bool per text."""
    token_counts: list[int]
    energy_j: float
    refused: bool = False
    """The gate did not allow the run to start (nothing ran)."""
    stopped_at: float | None = None
    """perf_counter time at which the gate stopped the run, if it did."""
    ended_at: float = 0.0
    """perf_counter time at which the model run returned (or raised)."""

    @property
    def complete(self) -> bool:
        return bool(self.done.all()) and not self.refused


def run_chunk(
    embedder: Embedder,
    gate: ComputeGate,
    texts: Sequence[str],
    lease_id: str | None = None,
    token_counts: Sequence[int] | None = None,
) -> ChunkOutcome:
    """Embed ``texts`` if and while the gate allows it (blocking; call on a compute thread)."""
    step = gate.begin(lease_id)
    if step is None:
        empty = np.zeros((len(texts), 0), dtype=np.float32)
        nothing = np.zeros(len(texts), dtype=bool)
        return ChunkOutcome(empty, nothing, [], 0.0, refused=True, ended_at=time.perf_counter())
    try:
        result = embedder.embed(texts, step.options, token_counts=token_counts)
        vectors, counts = result.vectors, result.token_counts
        done = np.ones(len(texts), dtype=bool)
    except InferenceCancelled as exc:
        assert exc.partial is not None and exc.done is not None
        vectors, counts, done = exc.partial.vectors, exc.partial.token_counts, exc.done
    ended = time.perf_counter()
    energy = gate.end(step)
    return ChunkOutcome(
        vectors, done, list(counts), energy, stopped_at=step.stopped_at, ended_at=ended
    )
