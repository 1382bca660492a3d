"""The car's side of embeddings: MiniLM runs of a unit's requests, results as float32 bytes.

An `EmbeddingRunner` wraps the agent's `Embedder`. Planning counts the unit's tokens once (so
no run has to tokenise before it can be stopped), puts requests of similar token totals
together (they pad least; the coordinator leases by characters) and cuts them into runs
bounded in requests and in result bytes. A run goes through `run_chunk`, the agent's one path
through the compute gate; a request is a result only if every one of its texts finished, its
bytes the little-endian float32 rows of its texts, one row of 384 each. The payloads come from
the cloud, so they are checked here again: anything but a non-empty list of strings is a
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from idlefleet.agent.chunk_runner import plan_chunks, run_chunk, vectors_per_chunk
from idlefleet.agent.runtime import Embedder
from idlefleet.models.catalog import MINILM
from idlefleet.workloads.base import ItemResult, PlannedRun, RunOutcome, UnitRunner

if TYPE_CHECKING:
    from idlefleet.agent.compute_gate import ComputeGate

__all__ = ["EmbeddingRunner"]


class EmbeddingRunner(UnitRunner):
    """Runs all-MiniLM-L6-v2 on the car's `Embedder`. Blocking: call on a compute thread."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.model = MINILM.id

    @property
    def provider(self) -> str:
        return self.embedder.provider

    def plan(self, payloads: Sequence[Any], max_requests: int) -> list[PlannedRun]:
        """Runs of similar token totals; each run's ``prepared`` is its texts' token counts."""
        texts = _texts_of(payloads)
        counts = self.embedder.count_tokens([t for request in texts for t in request])
        per_request = _split(counts, texts)
        order = sorted(range(len(texts)), key=lambda i: sum(per_request[i]))
        runs = plan_chunks(
            order, [len(request) for request in texts], max_requests, vectors_per_chunk(MINILM.dim)
        )
        return [PlannedRun(run, [c for i in run for c in per_request[i]]) for run in runs]

    def run(
        self,
        gate: ComputeGate,
        payloads: Sequence[Any],
        lease_id: str | None,
        prepared: Any = None,
        progress: Sequence[bytes | None] | None = None,
        report: Callable[[list[tuple[int, bytes]]], None] | None = None,
        report_every_s: float | None = None,
    ) -> RunOutcome:
        # An embedding run takes well under a lease: it neither reports nor resumes progress.
        texts = _texts_of(payloads)
        flat = [t for request in texts for t in request]
        if prepared is not None and len(prepared) != len(flat):
            raise ValueError(f"{len(prepared)} token counts planned for {len(flat)} texts")
        outcome = run_chunk(self.embedder, gate, flat, lease_id, prepared)
        if outcome.refused:
            return RunOutcome(
                [None] * len(texts),
                energy_j=outcome.energy_j,
                refused=True,
                ended_at=outcome.ended_at,
            )
        results: list[ItemResult | None] = []
        row = 0
        for request in texts:
            rows = slice(row, row + len(request))
            row += len(request)
            if bool(outcome.done[rows].all()):
                data = outcome.vectors[rows].astype("<f4").tobytes()
                results.append(ItemResult(data, sum(outcome.token_counts[rows])))
            else:
                results.append(None)  # a request is all its texts or nothing
        return RunOutcome(
            results,
            energy_j=outcome.energy_j,
            stopped_at=outcome.stopped_at,
            ended_at=outcome.ended_at,
        )


def _texts_of(payloads: Sequence[Any]) -> list[list[str]]:
    """The payloads as lists of texts; ``ValueError`` naming the first that is not one."""
    for i, payload in enumerate(payloads):
        if (
            not isinstance(payload, list)
            or not payload
            or not all(isinstance(t, str) for t in payload)
        ):
            raise ValueError(
                f"embeddings payload {i} must be a non-empty list of strings, "
                f"got {_describe(payload)}"
            )
    return list(payloads)


def _describe(payload: Any) -> str:
    if not isinstance(payload, list):
        return type(payload).__name__
    if not payload:
        return "an empty list"
    bad = next(t for t in payload if not isinstance(t, str))
    return f"a list with an item of type {type(bad).__name__}"


def _split(counts: Sequence[int], texts: Sequence[Sequence[str]]) -> list[list[int]]:
    """``counts`` (one per text, flat) cut per request."""
    per_request: list[list[int]] = []
    row = 0
    for request in texts:
        per_request.append(list(counts[row : row + len(request)]))
        row += len(request)
    return per_request
