"""The chat workload through its interface: plan (template, tokens, context window), the check
of a car's result, and the OpenAI shapes it renders — with a real generation on SmolLM2."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from idlefleet.coordinator.errors import InvalidRequest
from idlefleet.coordinator.store.base import StoredRequest
from idlefleet.llm.engine import Engine, GenerationRequest
from idlefleet.llm.sampling import SamplingParams
from idlefleet.workloads.chat import CHAT, DECODE_WEIGHT, DEFAULT_MAX_TOKENS, encode_result

MODEL = "SmolLM2-135M-Instruct"


def plan(**fields: Any) -> Any:
    return CHAT.plan({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields})


def test_plan_renders_the_template_and_sends_token_ids(smollm2: Any) -> None:
    planned = plan(max_tokens=12, temperature=0.3, seed=9, stop="\n")
    text = smollm2.chat_template().render([{"role": "user", "content": "Hi"}])
    prompt = smollm2.tokenizer().encode(text, add_special_tokens=False).ids
    assert planned.model == MODEL
    nonce = planned.payload.pop("nonce")
    assert isinstance(nonce, str) and nonce != plan().payload["nonce"]
    assert planned.payload == {
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0.3,
        "top_p": 1.0,
        "seed": 9,
        "stop": ["\n"],
    }
    assert json.loads(json.dumps(planned.payload)) == planned.payload
    assert (planned.cost.inputs, planned.cost.tokens) == (1, len(prompt) + 12)
    assert (
        CHAT.plan(
            {"model": f"HuggingFaceTB/{MODEL}", "messages": [{"role": "user", "content": "x"}]}
        ).model
        == MODEL
    )


def test_without_a_limit_the_completion_gets_the_default(smollm2: Any) -> None:
    assert plan().payload["max_tokens"] == DEFAULT_MAX_TOKENS


def test_a_prompt_beyond_the_context_window_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        plan(max_tokens=8190)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in caught.value.message
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(InvalidRequest):
        CHAT.plan({"model": MODEL, "messages": long})


@pytest.fixture(scope="module")
def generated(smollm2: Any, llama_session: Any) -> tuple[Any, list[int], str]:
    planned = plan(max_tokens=20, temperature=0)
    engine = Engine(llama_session, smollm2.config, slots=1)
    payload = planned.payload
    engine.add(
        GenerationRequest(
            "r",
            payload["prompt"],
            payload["max_tokens"],
            SamplingParams(temperature=0.0),
            stop_ids=frozenset({smollm2.eos_id}),
        )
    )
    tokens: list[int] = []
    reason = ""
    while engine.busy:
        for t in engine.step():
            if t.token is not None:
                tokens.append(t.token)
            reason = t.finish_reason or reason
    return planned, tokens, reason


def result_of(generated: Any, smollm2: Any, **change: Any) -> tuple[bytes, int]:
    planned, tokens, reason = generated
    fields = {
        "tokens": tokens,
        "text": smollm2.tokenizer().decode(tokens),
        "finish_reason": reason,
        "prompt_tokens": len(planned.payload["prompt"]),
    }
    fields.update(change)
    data = encode_result(**fields)
    return data, fields["prompt_tokens"] + len(fields["tokens"])


def check(generated: Any, data: bytes, used: int) -> str | None:
    planned = generated[0]
    return CHAT.check(MODEL, [3], [CHAT.expectation(planned.payload)], [len(data)], [used], data)


def test_a_real_generation_passes_the_check_and_renders_as_the_sdk_reads_it(
    generated: Any, smollm2: Any
) -> None:
    data, used = result_of(generated, smollm2)
    assert check(generated, data, used) is None

    stored = StoredRequest(3, "c-3", "done", "", MODEL, data, used, None, None)
    body = CHAT.render_batch([stored])[3]
    completion = ChatCompletion.model_validate_json(body)
    assert completion.choices[0].message.content == smollm2.tokenizer().decode(generated[1])
    assert completion.choices[0].finish_reason == generated[2]
    assert completion.usage is not None and completion.usage.total_tokens == used
    online = ChatCompletion.model_validate(CHAT.render_online(generated[0], data, used))
    assert online.id.startswith("chatcmpl-") and online.model == MODEL


def test_a_stop_sequence_may_cut_the_text(generated: Any, smollm2: Any) -> None:
    text = smollm2.tokenizer().decode(generated[1])
    data, used = result_of(generated, smollm2, text=text[:5], finish_reason="stop")
    assert check(generated, data, used) is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"text": "something else"}, "decode"),
        ({"tokens": [10**6]}, "vocabulary"),
        ({"tokens": list(range(21))}, "max_tokens"),
        ({"prompt_tokens": 3}, "prompt"),
        ({"finish_reason": "length", "tokens": [1, 2]}, "length"),
        ({"finish_reason": "done"}, "finish_reason"),
    ],
)
def test_results_that_cannot_be_right_are_refused(
    generated: Any, smollm2: Any, change: dict[str, Any], words: str
) -> None:
    data, used = result_of(generated, smollm2, **change)
    problem = check(generated, data, used)
    assert problem is not None and problem.startswith("request 3:") and words in problem


def test_garbage_and_wrong_usage_are_refused(generated: Any, smollm2: Any) -> None:
    assert "JSON" in (check(generated, b"\xff{", 1) or "")
    assert "object" in (check(generated, b"[1, 2]", 1) or "")
    data, used = result_of(generated, smollm2)
    assert "reports" in (check(generated, data, used + 1) or "")


def test_work_counts_a_generated_token_as_several_prefilled_ones(
    generated: Any, smollm2: Any
) -> None:
    planned, tokens, _ = generated
    data, _ = result_of(generated, smollm2)
    prompt = len(planned.payload["prompt"])
    assert CHAT.work(planned.payload, data) == prompt + DECODE_WEIGHT * len(tokens)
    assert CHAT.probe(planned.payload, data, 0).work == prompt + len(tokens)  # one prefill
    assert CHAT.work(planned.payload, b"junk") == prompt
