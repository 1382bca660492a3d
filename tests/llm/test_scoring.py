"""Teacher-forced re-scoring on the real SmolLM2 graph: what the engine generated misses by
nothing (greedy and sampled, also when the prefill is cut into chunks), the end of text after
a completion that ended there too, and tokens the model would not have chosen miss."""

from __future__ import annotations

import random
from typing import Any

import pytest

from idlefleet.llm.engine import Engine, GenerationRequest
from idlefleet.llm.sampling import SamplingParams
from idlefleet.llm.scoring import score
from tests.llm.test_engine import generate, prompt

CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "warm": SamplingParams(temperature=0.7, top_p=0.9, seed=11),
    "hot": SamplingParams(temperature=1.0, seed=12),
}


@pytest.fixture(scope="module")
def generated(
    smollm2: Any, llama_session: Any
) -> dict[str, tuple[GenerationRequest, list[int], str]]:
    requests = {
        name: GenerationRequest(
            f"score-{name}",
            prompt(
                smollm2,
                "What is the capital of France?" if name == "greedy" else "Tell me a story.",
            ),
            24,
            params,
            stop_ids=frozenset({smollm2.eos_id}),
            key=f"nonce:{name}",
        )
        for name, params in CASES.items()
    }
    tokens, reasons, _ = generate(
        Engine(llama_session, smollm2.config, slots=3), list(requests.values())
    )
    return {name: (r, tokens[r.id], reasons[r.id]) for name, r in requests.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_what_the_engine_generated_misses_by_nothing(
    smollm2: Any, llama_session: Any, generated: Any, name: str
) -> None:
    request, tokens, reason = generated[name]
    ends = frozenset({smollm2.eos_id}) if reason == "stop" else frozenset()

    scores = score(
        llama_session, smollm2.config, request.prompt, tokens, request.params, request.key, ends
    )

    assert len(scores.misses) == len(scores.logprobs) == len(tokens) + bool(ends)
    # Prefill and batched decode sum in another order: equal but for float near-ties.
    assert max(scores.misses) <= 1e-4
    assert all(-30 < lp <= 0 for lp in scores.logprobs)


def test_the_greedy_answer_ends_on_the_end_of_text(
    smollm2: Any, llama_session: Any, generated: Any
) -> None:
    request, tokens, reason = generated["greedy"]
    assert reason == "stop"
    ends = frozenset({smollm2.eos_id})
    whole = score(llama_session, smollm2.config, request.prompt, tokens, request.params, "", ends)
    cut = score(llama_session, smollm2.config, request.prompt, tokens[:3], request.params, "", ends)
    assert whole.misses[-1] == pytest.approx(0.0, abs=1e-4)
    assert cut.misses[-1] > 1.0  # "The capital of" does not end there: a gap of logits


def test_chunks_give_what_one_prefill_gives(
    smollm2: Any, llama_session: Any, generated: Any
) -> None:
    request, tokens, _ = generated["hot"]
    args = (llama_session, smollm2.config, request.prompt, tokens, request.params, request.key)
    whole = score(*args)
    chunked = score(*args, chunk=7)
    assert chunked.misses == pytest.approx(whole.misses, abs=1e-5)
    assert chunked.logprobs == pytest.approx(whole.logprobs, abs=1e-3)


def test_tokens_the_model_would_not_choose_miss(
    smollm2: Any, llama_session: Any, generated: Any
) -> None:
    request, tokens, _ = generated["warm"]
    rng = random.Random(3)
    noise = [rng.randrange(smollm2.config.vocab) for _ in tokens]
    scores = score(
        llama_session, smollm2.config, request.prompt, noise, request.params, request.key
    )
    assert min(scores.misses) > 0.01
    other_stream = score(
        llama_session, smollm2.config, request.prompt, tokens, request.params, "nonce:other"
    )
    assert max(other_stream.misses) > 0.01


def test_an_empty_completion_reads_only_the_end(smollm2: Any, llama_session: Any) -> None:
    ids = prompt(smollm2, "Hi")
    greedy = SamplingParams(temperature=0.0)
    assert score(llama_session, smollm2.config, ids, [], greedy, "").misses == []
    ended = score(llama_session, smollm2.config, ids, [], greedy, "", frozenset({2}))
    assert len(ended.misses) == 1 and ended.misses[0] > 0
