"""Continuous batching on the real SmolLM2 graph: sequences batched together give what each
gives alone, a finished sequence's slot is refilled, and a generation continued from a prefix
(a car that left mid-sentence) ends as the uninterrupted one."""

from __future__ import annotations

from typing import Any

import pytest

from idlefleet.llm.engine import Engine, GenerationRequest, Token
from idlefleet.llm.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Write one word that rhymes with cat.",
    "How many legs does a spider have?",
]
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)


def prompt(smollm2: Any, question: str) -> list[int]:
    text = smollm2.chat_template().render([{"role": "user", "content": question}])
    return list(smollm2.tokenizer().encode(text, add_special_tokens=False).ids)


def generate(
    engine: Engine, requests: list[GenerationRequest]
) -> tuple[dict[str, list[int]], dict[str, str], list[list[Token]]]:
    for request in requests:
        engine.add(request)
    tokens: dict[str, list[int]] = {r.id: list(r.prefix) for r in requests}
    reasons: dict[str, str] = {}
    steps: list[list[Token]] = []
    while engine.busy:
        step = engine.step()
        steps.append(step)
        for t in step:
            if t.token is not None:
                tokens[t.request].append(t.token)
            if t.finish_reason is not None:
                reasons[t.request] = t.finish_reason
    return tokens, reasons, steps


def requests(smollm2: Any, params: SamplingParams, max_new: int = 24) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"req-{i}",
            prompt(smollm2, q),
            max_new,
            params,
            stop_ids=frozenset({smollm2.eos_id}),
        )
        for i, q in enumerate(QUESTIONS)
    ]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_sequences_give_what_each_gives_alone(
    smollm2: Any, llama_session: Any, params: SamplingParams
) -> None:
    alone = {}
    for request in requests(smollm2, params):
        out, _, _ = generate(Engine(llama_session, smollm2.config, slots=1), [request])
        alone.update(out)

    together, reasons, steps = generate(
        Engine(llama_session, smollm2.config, slots=3), requests(smollm2, params)
    )

    assert together == alone
    assert set(reasons.values()) <= {"stop", "length"} and len(reasons) == len(QUESTIONS)
    # Three slots for four sequences: the fourth starts in the step where one finishes.
    assert {t.request for t in steps[0]} == {"req-0", "req-1", "req-2"}
    assert max(sum(t.finish_reason is None for t in step) for step in steps) <= 3
    joins = next(n for n, step in enumerate(steps) if "req-3" in {t.request for t in step})
    assert any(t.finish_reason for t in steps[joins])


def test_greedy_answers_and_ends_on_the_end_of_text_token(smollm2: Any, llama_session: Any) -> None:
    tokens, reasons, _ = generate(
        Engine(llama_session, smollm2.config, slots=4), requests(smollm2, GREEDY)
    )
    assert smollm2.tokenizer().decode(tokens["req-0"]) == "The capital of France is Paris."
    assert reasons["req-0"] == "stop"
    assert smollm2.eos_id not in tokens["req-0"]


def test_the_token_budget_ends_a_sequence_with_length(smollm2: Any, llama_session: Any) -> None:
    tokens, reasons, _ = generate(
        Engine(llama_session, smollm2.config, slots=4), requests(smollm2, GREEDY, max_new=3)
    )
    assert all(len(t) == 3 for t in tokens.values())
    assert set(reasons.values()) == {"length"}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_generation_continued_from_its_prefix_ends_as_the_uninterrupted_one(
    smollm2: Any, llama_session: Any, params: SamplingParams, cut: int
) -> None:
    whole = GenerationRequest(
        "story",
        prompt(smollm2, "Tell me a short story about a robot who learns to paint."),
        16,
        params,
        stop_ids=frozenset({smollm2.eos_id}),
    )
    full, reasons, _ = generate(Engine(llama_session, smollm2.config, slots=2), [whole])
    assert len(full[whole.id]) == 16 and reasons == {"story": "length"}

    moved = GenerationRequest(
        whole.id,
        whole.prompt,
        whole.max_new_tokens,
        params,
        prefix=full[whole.id][:cut],
        stop_ids=whole.stop_ids,
    )
    # Another car, batched with a different neighbour.
    continued, _, _ = generate(
        Engine(llama_session, smollm2.config, slots=2),
        [moved, requests(smollm2, params)[3]],
    )
    assert continued[whole.id] == full[whole.id]


def test_a_cancelled_sequence_leaves_its_slot(smollm2: Any, llama_session: Any) -> None:
    engine = Engine(llama_session, smollm2.config, slots=2)
    first, second = requests(smollm2, GREEDY)[:2]
    engine.add(first)
    engine.add(second)
    engine.step()
    engine.cancel(first.id)
    later = [t.request for t in engine.step()]
    assert later == [second.id]
