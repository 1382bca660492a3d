"""The car's chat runner on the real SmolLM2 graph and a real compute gate: plans, generations
that pass the coordinator's check, stop sequences, reproducible sampling, and the gate's stop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from idlefleet.workloads.chat import CHAT
from idlefleet.workloads.chat.runner import ChatRunner
from tests.workloads.embeddings.test_runner import (
    SessionThatCallsBack,
    allowed_gate,
    driver_sits_in,
)

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def runner(smollm2: Any, llama_session: Any) -> ChatRunner:
    return ChatRunner(
        MODEL, llama_session, smollm2.config, smollm2.tokenizer(), frozenset({smollm2.eos_id}), 4
    )


def payload(question: str, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], **fields}
    result: dict[str, Any] = CHAT.plan(body).payload
    return result


def checked(
    runner: ChatRunner, payloads: list[dict[str, Any]], outcome: Any
) -> list[dict[str, Any]]:
    """Every finished result through the coordinator's own check; their decoded JSON."""
    out = []
    for p, result in zip(payloads, outcome.results, strict=True):
        if result is None:
            continue
        problem = CHAT.check(
            MODEL, [0], [CHAT.expectation(p)], [len(result.data)], [result.tokens], result.data
        )
        assert problem is None, problem
        out.append(json.loads(result.data))
    return out


def test_a_plan_covers_every_request_once_longest_prompt_first(runner: ChatRunner) -> None:
    sizes = (1, 30, 5, 12, 3, 40, 2, 8, 9, 20, 6, 7, 4, 11, 13, 15, 17, 19)
    payloads = [payload("x " * n, max_tokens=4) for n in sizes]
    runs = runner.plan(payloads, max_requests=64)
    order = [i for run in runs for i in run.indices]
    assert sorted(order) == list(range(len(sizes)))
    lengths = [len(payloads[i]["prompt"]) for i in order]
    assert lengths == sorted(lengths, reverse=True)
    assert [len(run.indices) for run in runs] == [16, 2]  # 4 x 4 slots
    assert all(len(run.indices) <= 3 for run in runner.plan(payloads, max_requests=3))


def test_a_run_generates_every_request_as_the_coordinator_expects(runner: ChatRunner) -> None:
    payloads = [
        payload("What is the capital of France?", temperature=0, max_tokens=20),
        payload("Count from one to ten.", temperature=0, max_tokens=6),
        payload("Say hello.", temperature=0.7, seed=3, max_tokens=12),
    ]
    outcome = runner.run(allowed_gate(), payloads, "lease-1")

    assert outcome.complete and outcome.energy_j > 0
    first, second, _ = checked(runner, payloads, outcome)
    assert (first["text"], first["finish_reason"]) == ("The capital of France is Paris.", "stop")
    assert (len(second["tokens"]), second["finish_reason"]) == (6, "length")


def test_a_stop_sequence_ends_the_text_before_it(runner: ChatRunner) -> None:
    payloads = [
        payload("What is the capital of France?", temperature=0, max_tokens=20, stop=["Paris"])
    ]
    (result,) = checked(runner, payloads, runner.run(allowed_gate(), payloads, "lease-2"))
    assert (result["text"], result["finish_reason"]) == ("The capital of France is ", "stop")


def test_sampling_is_reproducible_on_any_car_with_any_neighbours(runner: ChatRunner) -> None:
    seeded = payload("Tell me a joke.", temperature=1.0, seed=77, max_tokens=16)
    unseeded = payload("Tell me a fact.", temperature=1.0, max_tokens=16)
    neighbour = payload("Name a fruit.", temperature=0, max_tokens=8)

    alone = checked(runner, [seeded, unseeded], runner.run(allowed_gate(), [seeded, unseeded], "a"))
    mixed = checked(
        runner,
        [neighbour, unseeded, seeded],
        runner.run(allowed_gate(), [neighbour, unseeded, seeded], "b"),
    )
    assert mixed[2]["tokens"] == alone[0]["tokens"]
    assert mixed[1]["tokens"] == alone[1]["tokens"]
    # Another request without a seed gets another nonce, so another stream.
    other = payload("Tell me a fact.", temperature=1.0, max_tokens=16)
    assert other["nonce"] != unseeded["nonce"]


def test_the_gate_stops_a_run_within_a_step_and_keeps_what_finished(
    smollm2: Any, llama_session: Any
) -> None:
    gate = allowed_gate()
    session = SessionThatCallsBack(llama_session, 6, lambda: driver_sits_in(gate))
    runner = ChatRunner(
        MODEL, session, smollm2.config, smollm2.tokenizer(), frozenset({smollm2.eos_id}), 4
    )
    payloads = [
        payload("Say yes.", temperature=0, max_tokens=2),
        payload("Write a long story about the sea.", temperature=0, max_tokens=200),
    ]

    outcome = runner.run(gate, payloads, "lease-3")

    assert outcome.stopped_at is not None and not outcome.complete
    assert session.runs <= 7  # the call that saw the stop, at most one more
    assert outcome.results[1] is None
    assert [r["finish_reason"] for r in checked(runner, payloads, outcome)] == ["length"]


def test_a_gate_that_forbids_refuses_the_run(runner: ChatRunner) -> None:
    gate = allowed_gate()
    driver_sits_in(gate)
    outcome = runner.run(gate, [payload("Hi", max_tokens=3)], "lease-4")
    assert outcome.refused and outcome.results == [None]


def test_a_unit_mixing_generations_and_probes_returns_both(runner: ChatRunner) -> None:
    earlier = [
        payload("Name a fruit.", temperature=0.8, max_tokens=10),
        payload("What is the capital of France?", temperature=0, max_tokens=20),
    ]
    (fruit, capital) = runner.run(allowed_gate(), earlier, "lease-0").results
    assert fruit is not None and capital is not None
    probes = [CHAT.probe(earlier[0], fruit.data, 0), CHAT.probe(earlier[1], capital.data, 0)]
    unit = [
        payload("Say hello.", temperature=0.7, seed=3, max_tokens=8),
        probes[0].payload,
        payload("Count from one to ten.", temperature=0, max_tokens=6),
        probes[1].payload,
    ]
    runs = runner.plan(unit, max_requests=64)
    assert sorted(i for run in runs for i in run.indices) == [0, 1, 2, 3]

    outcome = runner.run(allowed_gate(), unit, "lease-5")

    assert outcome.complete
    for i, request in enumerate(unit):
        result = outcome.results[i]
        assert result is not None
        expected = CHAT.expectation(request)
        data = result.data
        assert CHAT.check(MODEL, [i], [expected], [len(data)], [result.tokens], data) is None
    assert [json.loads(outcome.results[i].data)["finish_reason"] for i in (0, 2)] == [
        "length",
        "length",
    ]
    for i, probe in zip((1, 3), probes, strict=True):
        answer = outcome.results[i].data
        assert outcome.results[i].tokens == probe.work
        assert CHAT.agree(MODEL, probe.payload, probe.reference, answer, same_class=True)


def test_a_plan_keeps_each_run_s_results_within_a_result_chunk(runner: ChatRunner) -> None:
    from idlefleet.workloads.chat.runner import RUN_RESULT_BYTES, _Job

    long = [payload("Hi", max_tokens=8000) for _ in range(20)]
    completion = {"completion": [17] * 4000, "finish_reason": "length"}
    probes = [dict(payload("Hi", max_tokens=4000), **completion) for _ in range(30)]

    for unit in (long, probes, long[:5] + probes[:20]):
        runs = runner.plan(unit, max_requests=64)
        assert sorted(i for run in runs for i in run.indices) == list(range(len(unit)))
        for run in runs:
            jobs = [runner._job(str(i), unit[i]) for i in run.indices]
            assert sum(job.result_bytes for job in jobs) <= RUN_RESULT_BYTES
    assert max(len(run.indices) for run in runner.plan(long, 64)) < 16  # bytes, not slots
    assert isinstance(runner._job("p", probes[0]), _Job)


@pytest.mark.parametrize(
    "bad",
    [
        "text",
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "completion": [1, 2, 3, 4]},
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "completion": [10**9]},
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "completion": "abc"},
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "completion": [1], "finish_reason": "x"},
        {"prompt": [], "max_tokens": 3, "nonce": "n"},
        {"prompt": [10**9], "max_tokens": 3, "nonce": "n"},
        {"prompt": [1, 2], "max_tokens": 0, "nonce": "n"},
        {"prompt": [1, 2], "max_tokens": 3},
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "stop": ["a"] * 5},
        {"prompt": [1, 2], "max_tokens": 3, "nonce": "n", "temperature": 9},
    ],
)
def test_a_payload_that_is_not_a_chat_request_is_refused(runner: ChatRunner, bad: Any) -> None:
    with pytest.raises(ValueError):
        runner.plan([bad], 8)


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 5}], ids=["greedy", "seeded"]
)
def test_a_generation_stopped_mid_run_continues_from_its_reported_progress(
    smollm2: Any, llama_session: Any, sampling: dict[str, Any]
) -> None:
    story = payload("Write a story about a lighthouse.", max_tokens=24, **sampling)

    def make(session: Any) -> ChatRunner:
        return ChatRunner(
            MODEL,
            session,
            smollm2.config,
            smollm2.tokenizer(),
            frozenset({smollm2.eos_id}),
            4,
            report_every_s=0.0,  # report after every step
        )

    (whole,) = checked(
        make(llama_session), [story], make(llama_session).run(allowed_gate(), [story], "a")
    )

    # First car: stopped after 10 model calls; what it reported is kept by the coordinator.
    gate = allowed_gate()
    stopping = SessionThatCallsBack(llama_session, 10, lambda: driver_sits_in(gate))
    reports: list[list[tuple[int, bytes]]] = []
    first = make(stopping).run(gate, [story], "lease-x", None, None, reports.append)
    assert first.results == [None] and first.stopped_at is not None
    progress = reports[-1][0][1]
    assert 0 < len(json.loads(progress)["tokens"]) < 24
    assert (
        CHAT.check_progress(MODEL, [0], [CHAT.expectation(story)], [len(progress)], progress)
        is None
    )

    # Second car: continues from the progress and ends as the uninterrupted run.
    (resumed,) = checked(
        make(llama_session),
        [story],
        make(llama_session).run(allowed_gate(), [story], "lease-y", None, [progress]),
    )
    assert resumed["tokens"] == whole["tokens"]
    assert resumed["text"] == whole["text"]
