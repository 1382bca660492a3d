"""The car's embeddings runner with the real MiniLM: plans that lose nothing, exact result bytes,
partial runs that keep only whole requests, and payloads from the cloud checked again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from idlefleet.agent.chunk_runner import RESULT_CHUNK_BYTES
from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.policy_guard import PolicyGuard
from idlefleet.agent.runtime import Embedder, load_tokenizer
from idlefleet.agent.sources.trace import parked_state
from idlefleet.agent.vehicle_state import StateAssembler
from idlefleet.models.cache import ModelCache, ensure_minilm
from idlefleet.models.catalog import MINILM
from idlefleet.models.minilm import default_model_dir
from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.workloads.embeddings.runner import EmbeddingRunner

SEAT = "Vehicle.Cabin.Seat.Row1.DriverSide.OccupancyStatus"
ROW_BYTES = MINILM.dim * 4


@pytest.fixture(scope="module")
def model_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def embedder(model_cache_root: Path) -> Embedder:
    return Embedder.load(model_cache_root, threads=1)


@pytest.fixture(scope="module")
def runner(embedder: Embedder) -> EmbeddingRunner:
    return EmbeddingRunner(embedder)


def allowed_gate() -> ComputeGate:
    """A gate of an opted-in car parked with nobody in it: every step may start."""
    gate = ComputeGate(PolicyGuard(OwnerPolicy(opted_in=True), 0), time.time, rated_power_w=65.0)
    gate.on_reading(StateAssembler().apply(parked_state(), time.time()))
    assert gate.verdict.allowed, gate.verdict.detail
    return gate


def driver_sits_in(gate: ComputeGate) -> None:
    gate.on_reading(StateAssembler().apply({**parked_state(), SEAT: "OCCUPIED"}, time.time()))


class SessionThatCallsBack:
    """An ONNX Runtime session that calls ``after_run`` once its ``n``-th run has returned."""

    def __init__(self, session: ort.InferenceSession, n: int, after_run: Callable[[], Any]):
        self._session = session
        self._n = n
        self._after_run = after_run
        self.runs = 0

    def run(self, *args: Any) -> Any:
        out = self._session.run(*args)
        self.runs += 1
        if self.runs == self._n:
            self._after_run()
        return out


def test_a_plan_runs_every_request_once_shortest_first_within_both_bounds(
    runner: EmbeddingRunner, embedder: Embedder
) -> None:
    # 1,000 small requests and three of 700 texts: runs are cut by count and by result bytes.
    payloads: list[Any] = [[f"request {i} " + "word " * (i % 40)] for i in range(1000)]
    payloads += [[f"big {k} text {j}" for j in range(700)] for k in range(3)]

    runs = runner.plan(payloads, max_requests=64)

    order = [i for run in runs for i in run.indices]
    assert sorted(order) == list(range(len(payloads)))
    totals = [sum(embedder.count_tokens(p)) for p in payloads]
    assert [totals[i] for i in order] == sorted(totals)  # similar lengths run together
    for run in runs:
        assert 1 <= len(run.indices) <= 64
        texts = [t for i in run.indices for t in payloads[i]]
        wire_bytes = 4 * ((len(texts) * ROW_BYTES + 2) // 3)  # base64
        assert len(run.indices) == 1 or wire_bytes <= RESULT_CHUNK_BYTES
        assert run.prepared == embedder.count_tokens(texts)
    # Two big requests together would be 1,400 rows, over the byte bound: never in one run.
    big = {1000, 1001, 1002}
    assert all(len(big.intersection(run.indices)) <= 1 for run in runs)
    assert runs[-1].indices == [1002] and runs[-2].indices == [1001]


def test_a_run_gives_each_request_its_float32_rows_as_the_embedder_computes_them(
    runner: EmbeddingRunner, embedder: Embedder
) -> None:
    payloads: list[Any] = [
        ["The car is parked.", "It charges overnight."],
        ["One text"],
        ["Ünïcode and  spaces ", "a", "a much longer input " * 30],
    ]
    (run,) = runner.plan(payloads, max_requests=64)
    chosen = [payloads[i] for i in run.indices]

    outcome = runner.run(allowed_gate(), chosen, "lease-1", run.prepared)

    assert outcome.complete and outcome.stopped_at is None and outcome.energy_j > 0
    expected = embedder.embed([t for texts in chosen for t in texts])
    row = 0
    for texts, result in zip(chosen, outcome.results, strict=True):
        assert result is not None
        rows = expected.vectors[row : row + len(texts)]
        assert result.data == np.ascontiguousarray(rows, dtype="<f4").tobytes()
        assert len(result.data) == len(texts) * ROW_BYTES
        assert result.tokens == sum(expected.token_counts[row : row + len(texts)])
        row += len(texts)


def test_a_run_without_a_plan_counts_its_own_tokens(
    runner: EmbeddingRunner, embedder: Embedder
) -> None:
    outcome = runner.run(allowed_gate(), [["online request", "two texts"]], None)

    (result,) = outcome.results
    assert result is not None
    expected = embedder.embed(["online request", "two texts"])
    assert result.data == expected.vectors.astype("<f4").tobytes()
    assert result.tokens == sum(expected.token_counts)


def test_a_stop_mid_run_keeps_only_the_requests_whose_every_text_finished(
    model_cache_root: Path, embedder: Embedder
) -> None:
    # One text per micro-batch, shortest first: the driver sits in after the two shortest.
    sha, _ = ensure_minilm(model_cache_root)
    gate = allowed_gate()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as Embedder.load's, so the rows agree to the bit
    session = SessionThatCallsBack(
        ort.InferenceSession(ModelCache(model_cache_root).get(sha), options),
        n=2,
        after_run=lambda: driver_sits_in(gate),
    )
    one_by_one = Embedder(
        session,
        load_tokenizer(default_model_dir()),
        model_sha256=sha,
        micro_batch=1,
    )
    payloads: list[Any] = [
        ["hi"],  # done: its only text is one of the two shortest
        ["yo", "a long text that runs last " * 10],  # the short text is done, the long is not
        ["a text of middling length"],  # not started
    ]

    outcome = EmbeddingRunner(one_by_one).run(gate, payloads, "lease-2")

    assert session.runs == 2
    assert not outcome.complete and not outcome.refused and outcome.stopped_at is not None
    assert outcome.ended_at >= outcome.stopped_at and outcome.energy_j > 0
    kept, partial, unstarted = outcome.results
    assert kept is not None and partial is None and unstarted is None
    alone = embedder.embed(["hi"])  # a batch of one, as in the stopped run
    assert kept.data == alone.vectors.astype("<f4").tobytes()
    assert kept.tokens == alone.token_counts[0]


def test_a_run_the_gate_refuses_runs_nothing_and_finishes_nothing(
    runner: EmbeddingRunner,
) -> None:
    no_reading_yet = ComputeGate(
        PolicyGuard(OwnerPolicy(opted_in=True), 0), time.time, rated_power_w=65.0
    )

    outcome = runner.run(no_reading_yet, [["a"], ["b", "c"]], "lease-3")

    assert outcome.refused and not outcome.complete
    assert list(outcome.results) == [None, None]
    assert outcome.energy_j == 0.0 and outcome.stopped_at is None


@pytest.mark.parametrize(
    ("payload", "got"),
    [
        ("a bare string", "str"),
        ([], "an empty list"),
        (["text", 7], "a list with an item of type int"),
        ([["nested"]], "a list with an item of type list"),
        ({"input": ["x"]}, "dict"),
        (None, "NoneType"),
    ],
)
def test_a_payload_that_is_not_a_non_empty_list_of_strings_is_refused(
    runner: EmbeddingRunner, payload: Any, got: str
) -> None:
    payloads = [["fine"], payload]
    message = f"embeddings payload 1 must be a non-empty list of strings, got {got}"

    with pytest.raises(ValueError, match=message):
        runner.plan(payloads, max_requests=64)
    with pytest.raises(ValueError, match=message):
        runner.run(allowed_gate(), payloads, "lease-4")
