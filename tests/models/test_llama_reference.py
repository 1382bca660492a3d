"""SmolLM2 on our graph, tokenizer and template against transformers on the same GGUF
(``tests/data/smollm2_reference.json``, made by ``scripts/make_llm_reference.py``): the same
prompt tokens, the same greedy tokens (up to 64, or to the end of text) on at least 95% of 60
varied conversations, and the reference's best logits at the first new position."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idlefleet.llm.engine import Engine, GenerationRequest
from idlefleet.llm.sampling import SamplingParams
from idlefleet.models.llama_onnx import prefill_feed

REFERENCE = Path(__file__).parents[1] / "data" / "smollm2_reference.json"


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert len(data["records"]) >= 50
    return data


def test_prompts_render_and_tokenize_as_transformers_does(
    smollm2: Any, reference: dict[str, Any]
) -> None:
    tokenizer, template = smollm2.tokenizer(), smollm2.chat_template()
    for record in reference["records"]:
        text = template.render(record["messages"])
        assert tokenizer.encode(text, add_special_tokens=False).ids == record["prompt_ids"]


def test_greedy_tokens_equal_the_reference_on_95_percent_of_prompts(
    smollm2: Any, llama_session: Any, reference: dict[str, Any]
) -> None:
    records = reference["records"]
    eos = smollm2.eos_id
    engine = Engine(llama_session, smollm2.config, slots=16)
    for i, record in enumerate(records):
        engine.add(
            GenerationRequest(
                f"{i}",
                record["prompt_ids"],
                reference["new_tokens"],
                SamplingParams(0.0),
                stop_ids=frozenset({eos}),
            )
        )
    got: list[list[int]] = [[] for _ in records]
    while engine.busy:
        for token in engine.step():
            if token.token is not None:
                got[int(token.request)].append(token.token)

    # The reference's tokens end with the end-of-text token when the model ended sooner; the
    # engine leaves it out (it ends the sequence).
    wanted = [[t for t in r["greedy_ids"] if t != eos] for r in records]
    assert any(len(w) < reference["new_tokens"] for w in wanted)  # some end early, some not
    assert any(len(w) == reference["new_tokens"] for w in wanted)
    same = sum(g == w for g, w in zip(got, wanted, strict=True))
    assert same >= 0.95 * len(records), f"{same}/{len(records)} identical"


def test_first_position_logits_match_the_reference(
    smollm2: Any, llama_session: Any, reference: dict[str, Any]
) -> None:
    worst = 0.0
    for record in reference["records"][:12]:
        ids = record["prompt_ids"]
        feed = prefill_feed(smollm2.config, ids, len(ids) - 1)
        logits = llama_session.run(["logits"], feed)[0][0, -1]
        top = record["first_top10_ids"]
        worst = max(
            worst, float(np.abs(logits[top] - np.array(record["first_top10_logits"])).max())
        )
        assert int(np.argmax(logits)) == top[0]
    assert worst < 1e-3, worst  # scripts/make_llm_reference.py measured 1.85e-4 at most
