"""Verification of chat completions end to end on the real SmolLM2 graph: a car's results are
probed (``CHAT.probe``), another car's runner re-reads them (one prefill each), the
coordinator checks the answers (``CHAT.check``) and judges them (``CHAT.agree``). Honest
generations at several temperatures are agreed; cheats that pass the commit's check are not."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from idlefleet.workloads.base import Probe
from idlefleet.workloads.chat import CHAT, encode_result
from idlefleet.workloads.chat.runner import ChatRunner
from idlefleet.workloads.chat.verify import encode_answer
from tests.workloads.chat.test_runner import MODEL, payload
from tests.workloads.embeddings.test_runner import allowed_gate

SETTINGS = {
    "greedy": {"temperature": 0},
    "t0.7": {"temperature": 0.7},
    "t0.7-p0.9": {"temperature": 0.7, "top_p": 0.9},
    "t1": {"temperature": 1.0},
    "t1-p0.9-seed": {"temperature": 1.0, "top_p": 0.9, "seed": 4},
}
QUESTIONS = {
    "greedy": "What is the capital of France?",
    "t0.7": "Write a short poem about the sea.",
    "t0.7-p0.9": "Explain how a battery stores energy.",
    "t1": "Describe a parked car at night.",
    "t1-p0.9-seed": "Give three tips for saving electricity at home.",
}

Finished = dict[str, tuple[dict[str, Any], bytes]]


@pytest.fixture(scope="module")
def runner(smollm2: Any, llama_session: Any) -> ChatRunner:
    return ChatRunner(
        MODEL, llama_session, smollm2.config, smollm2.tokenizer(), frozenset({smollm2.eos_id}), 8
    )


@pytest.fixture(scope="module")
def finished(runner: ChatRunner) -> Finished:
    """Honest results at every setting, and material for cheats: the t0.7 request sampled at
    temperature 2 (a model of another distribution) and from another random stream."""
    payloads = {name: payload(QUESTIONS[name], max_tokens=32, **s) for name, s in SETTINGS.items()}
    hot = dict(payloads["t0.7"], temperature=2.0)
    payloads["hotter"] = hot
    payloads["other-stream"] = dict(payloads["t0.7"], nonce="not the request's")
    names = list(payloads)
    outcome = runner.run(allowed_gate(), [payloads[n] for n in names], "generate")
    assert outcome.complete
    return {n: (payloads[n], r.data) for n, r in zip(names, outcome.results, strict=True) if r}


def answers(runner: ChatRunner, probes: list[Probe]) -> list[bytes]:
    """Another car's answers to the probes, checked by the coordinator as it would be."""
    outcome = runner.run(allowed_gate(), [p.payload for p in probes], "verify")
    assert outcome.complete
    out = []
    for probe, result in zip(probes, outcome.results, strict=True):
        assert result is not None
        expected = CHAT.expectation(probe.payload)
        problem = CHAT.check(
            MODEL, [7], [expected], [len(result.data)], [result.tokens], result.data
        )
        assert problem is None, problem
        out.append(result.data)
    return out


def forged(request: dict[str, Any], tokens: list[int], reason: str, tokenizer: Any) -> bytes:
    """A result a cheat could commit: it passes the coordinator's check."""
    data = encode_result(tokens, tokenizer.decode(tokens), reason, len(request["prompt"]))
    used = len(request["prompt"]) + len(tokens)
    expected = CHAT.expectation(request)
    assert CHAT.check(MODEL, [1], [expected], [len(data)], [used], data) is None
    return data


def test_a_probe_is_the_request_and_its_whole_completion(finished: Finished) -> None:
    request, result = finished["t1"]
    probe = CHAT.probe(request, result, pick=12345)
    tokens = json.loads(result)["tokens"]
    assert probe.payload == {
        **request,
        "completion": tokens,
        "finish_reason": json.loads(result)["finish_reason"],
    }
    assert probe.reference == result
    assert probe.work == len(request["prompt"]) + len(tokens) < CHAT.work(request, result)
    assert CHAT.probe(request, result, pick=1) == probe
    with pytest.raises(ValueError):
        CHAT.probe(request, b"junk", pick=1)
    with pytest.raises(ValueError):
        CHAT.probe(probe.payload, result, pick=1)  # a probe is not probed again


def test_honest_generations_are_agreed_at_every_temperature(
    runner: ChatRunner, finished: Finished
) -> None:
    probes = [CHAT.probe(*finished[name], pick=0) for name in SETTINGS]
    for name, probe, answer in zip(SETTINGS, probes, answers(runner, probes), strict=True):
        assert CHAT.agree(MODEL, probe.payload, probe.reference, answer, True), name
        assert CHAT.agree(MODEL, probe.payload, probe.reference, answer, False), name


Cheat = Callable[[Finished, Any], tuple[dict[str, Any], bytes]]


def random_tokens(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request, result = finished["t1"]
    rng = random.Random(5)
    tokens = [rng.randrange(49_152) for _ in json.loads(result)["tokens"]]
    return request, forged(request, tokens, json.loads(result)["finish_reason"], tokenizer)


def another_prompts_completion(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request = finished["t0.7-p0.9"][0]
    other = json.loads(finished["t0.7"][1])
    return request, forged(request, other["tokens"], other["finish_reason"], tokenizer)


def cut_short_claiming_stop(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request, result = finished["t0.7-p0.9"]
    tokens = json.loads(result)["tokens"]
    return request, forged(request, tokens[: len(tokens) // 2], "stop", tokenizer)


def greedy_cut_short(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request, result = finished["greedy"]
    tokens = json.loads(result)["tokens"]
    return request, forged(request, tokens[:3], "stop", tokenizer)


def a_hotter_sample(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request = finished["t0.7"][0]
    hot = json.loads(finished["hotter"][1])
    return request, forged(request, hot["tokens"], hot["finish_reason"], tokenizer)


def another_random_stream(finished: Finished, tokenizer: Any) -> tuple[dict[str, Any], bytes]:
    request = finished["t0.7"][0]
    other = json.loads(finished["other-stream"][1])
    return request, forged(request, other["tokens"], other["finish_reason"], tokenizer)


@pytest.mark.parametrize(
    "cheat",
    [
        random_tokens,
        another_prompts_completion,
        cut_short_claiming_stop,
        greedy_cut_short,
        a_hotter_sample,
        another_random_stream,
    ],
)
def test_cheats_that_pass_the_check_are_refused(
    runner: ChatRunner, finished: Finished, smollm2: Any, cheat: Cheat
) -> None:
    request, result = cheat(finished, smollm2.tokenizer())
    probe = CHAT.probe(request, result, pick=0)
    (answer,) = answers(runner, [probe])
    assert not CHAT.agree(MODEL, probe.payload, probe.reference, answer, True)
    assert not CHAT.agree(MODEL, probe.payload, probe.reference, answer, False)


def test_a_stop_string_must_end_the_completion_where_the_runner_would(
    runner: ChatRunner, finished: Finished, smollm2: Any
) -> None:
    tokenizer = smollm2.tokenizer()
    request, result = finished["t1"]
    tokens = json.loads(result)["tokens"]
    # A stop string that the completion first holds when its k-th token is out.
    k, stop = next(
        (k, s)
        for k in range(3, len(tokens))
        if (s := tokenizer.decode(tokens[k - 2 : k])).strip()
        and "\ufffd" not in s
        and s in tokenizer.decode(tokens[:k])
        and s not in tokenizer.decode(tokens[: k - 1])
    )
    stopped = dict(request, stop=[stop])
    text = tokenizer.decode(tokens[:k])
    cut = text[: text.find(stop)]
    honest = encode_result(tokens[:k], cut, "stop", len(request["prompt"]))
    overran = encode_result(tokens, cut, "stop", len(request["prompt"]))  # went on past it
    probes = [CHAT.probe(stopped, honest, 0), CHAT.probe(stopped, overran, 0)]
    first, second = answers(runner, probes)
    assert CHAT.agree(MODEL, probes[0].payload, honest, first, True)
    assert not CHAT.agree(MODEL, probes[1].payload, overran, second, True)


def test_two_answers_are_compared_value_by_value(
    runner: ChatRunner, finished: Finished, smollm2: Any
) -> None:
    """A tie-break compares another verifier's answer with the first's: honest ones agree, a
    car that answers zeros without running the model does not."""
    probe = CHAT.probe(*finished["t1"], pick=0)
    first, second = answers(runner, [probe, probe])
    parsed = json.loads(first)
    lazy = encode_answer([0.0] * len(parsed["misses"]), [0.0] * len(parsed["logprobs"]))
    assert CHAT.agree(MODEL, probe.payload, first, second, True)
    assert not CHAT.agree(MODEL, probe.payload, first, lazy, True)
    assert not CHAT.agree(MODEL, probe.payload, first, lazy, False)
    # Against the result itself, though, the lazy answer is all the coordinator can see.
    assert CHAT.agree(MODEL, probe.payload, probe.reference, lazy, True)


def test_answers_are_checked_before_they_are_judged(finished: Finished) -> None:
    request, result = finished["t0.7"]
    probe = CHAT.probe(request, result, pick=0)
    limits = CHAT.expectation(probe.payload)
    n = len(json.loads(result)["tokens"]) + (json.loads(result)["finish_reason"] == "stop")
    used = probe.work

    def check(data: bytes, tokens: int = used) -> str | None:
        return CHAT.check(MODEL, [9], [limits], [len(data)], [tokens], data)

    good = encode_answer([0.0] * n, [-1.0] * n)
    assert check(good) is None
    for data, words in [
        (b"\xff", "JSON"),
        (b'{"misses": [], "ranks": []}', "misses and logprobs"),
        (encode_answer([0.0] * (n + 1), [-1.0] * (n + 1)), f"the probe has {n}"),
        (json.dumps({"misses": [-1.0] * n, "logprobs": [-1.0] * n}).encode(), "misses"),
        (json.dumps({"misses": [0.0] * n, "logprobs": [1.0] * n}).encode(), "logprobs"),
        (b'{"misses": [0, NaN], "logprobs": [0, 0]}', "finite"),
        (encode_result([1], "x", "stop", 3), "misses and logprobs"),
    ]:
        problem = check(data)
        assert problem is not None and problem.startswith("request 9:") and words in problem
    assert "reads" in (check(good, used + 1) or "")
    assert "no progress" in (CHAT.check_progress(MODEL, [9], [limits], [len(good)], good) or "")
    # Not known here (another replica's lease): an answer is as good as a result.
    assert CHAT.check(MODEL, [9], [None], [len(good)], [used], good) is None
    # Malformed answers and references are never agreed.
    assert not CHAT.agree(MODEL, probe.payload, result, b"junk", True)
    assert not CHAT.agree(MODEL, probe.payload, b"junk", good, True)
    assert not CHAT.agree(MODEL, request, result, good, True)  # not a probe
    assert not CHAT.agree("no-such-model", probe.payload, result, good, True)
