"""SmolLM2 from its GGUF: configuration, tokenizer, chat template, and the ONNX graph with a
key/value cache against the plain numpy forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from idlefleet.models.gguf_llama import GGUFModel, LlamaConfig
from idlefleet.models.llama_numpy import llama_logits
from idlefleet.models.llama_onnx import cache_names


@pytest.fixture(scope="module")
def weights(smollm2: GGUFModel) -> dict[str, np.ndarray]:
    return smollm2.weights()


@pytest.fixture
def session(llama_session: ort.InferenceSession) -> ort.InferenceSession:
    return llama_session


def test_the_configuration_comes_from_the_gguf_metadata(smollm2: GGUFModel) -> None:
    assert smollm2.config == LlamaConfig(
        layers=30,
        dim=576,
        ffn_dim=1536,
        heads=9,
        kv_heads=3,
        vocab=49_152,
        context=8192,
        rope_base=100_000.0,
        rms_eps=pytest.approx(1e-5),  # type: ignore[arg-type]
        tied_embeddings=True,
    )
    assert (smollm2.config.head_dim, smollm2.config.group) == (64, 3)
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "日本語のテキストです。", "Привет, мир!", "Xin chào 🚗💨", "x = 12345;\n\ty"],
)
def test_the_tokenizer_round_trips_text(smollm2: GGUFModel, text: str) -> None:
    tokenizer = smollm2.tokenizer()
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_control_tokens_are_single_tokens_and_digits_are_split(smollm2: GGUFModel) -> None:
    tokenizer = smollm2.tokenizer()
    ids = tokenizer.encode("<|im_start|>user\n2024<|im_end|>").ids
    assert ids[0] == smollm2.bos_id and ids[-1] == smollm2.eos_id
    # Each digit is its own piece (the pre-tokenizer splits them), as in the reference.
    assert [tokenizer.decode([i]) for i in ids[3:-1]] == ["2", "0", "2", "4"]


def test_the_chat_template_adds_the_default_system_message_and_opens_the_answer(
    smollm2: GGUFModel,
) -> None:
    template = smollm2.chat_template()
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        add_generation_prompt=False,
    )
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert own.endswith("<|im_start|>user\nBye<|im_end|>\n")
    assert "You are a helpful" not in own


class Cached:
    """Runs the graph one call at a time, keeping the cache (left-padded sequences)."""

    def __init__(self, session: ort.InferenceSession, cfg: LlamaConfig, batch: int) -> None:
        self.session = session
        self.past, _ = cache_names(cfg.layers)
        shape = (batch, cfg.kv_heads, 0, cfg.head_dim)
        self.cache = [np.zeros(shape, dtype=np.float32) for _ in self.past]
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    def step(self, ids: Sequence[Sequence[int]], positions: Any, real: Any) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.asarray(real, dtype=np.int64)], axis=1)
        feed: dict[str, Any] = {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "position_ids": np.asarray(positions, dtype=np.int64),
            "attention_mask": self.mask,
            "logits_from": np.array([0], dtype=np.int64),  # every position's logits
        }
        feed.update(zip(self.past, self.cache, strict=True))
        logits, *self.cache = self.session.run(None, feed)
        return np.asarray(logits)


def prompt_ids(smollm2: GGUFModel, question: str) -> list[int]:
    text = smollm2.chat_template().render([{"role": "user", "content": question}])
    return list(smollm2.tokenizer().encode(text, add_special_tokens=False).ids)


def test_the_graph_gives_the_numpy_forward_pass_logits(
    smollm2: GGUFModel, weights: dict[str, np.ndarray], session: ort.InferenceSession
) -> None:
    ids = prompt_ids(smollm2, "Name three colours.")
    logits = Cached(session, smollm2.config, 1).step([ids], [range(len(ids))], [[1] * len(ids)])

    reference = llama_logits(smollm2.config, weights, ids)
    assert np.abs(logits[0] - reference).max() < 1e-3  # measured 7e-5 on logits up to ~40


def test_decoding_with_the_cache_equals_running_the_whole_sequence(
    smollm2: GGUFModel, session: ort.InferenceSession
) -> None:
    ids = prompt_ids(smollm2, "Count to five.")
    whole = Cached(session, smollm2.config, 1).step([ids], [range(len(ids))], [[1] * len(ids)])

    cached = Cached(session, smollm2.config, 1)
    head = len(ids) - 3
    parts = [cached.step([ids[:head]], [range(head)], [[1] * head])]
    for position in range(head, len(ids)):
        parts.append(cached.step([[ids[position]]], [[position]], [[1]]))

    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=2e-4)


def test_sequences_of_different_lengths_share_a_call_through_the_mask(
    smollm2: GGUFModel, session: ort.InferenceSession
) -> None:
    short, long = prompt_ids(smollm2, "Hi"), prompt_ids(smollm2, "What is the tallest mountain?")
    alone = [
        Cached(session, smollm2.config, 1).step([s], [range(len(s))], [[1] * len(s)])[0, -1]
        for s in (short, long)
    ]

    pad = len(long) - len(short)  # the short one is left-padded; its positions start at 0
    batch = Cached(session, smollm2.config, 2)
    logits = batch.step(
        [[0] * pad + short, long],
        [[0] * pad + list(range(len(short))), list(range(len(long)))],
        [[0] * pad + [1] * len(short), [1] * len(long)],
    )
    np.testing.assert_allclose(logits[0, -1], alone[0], atol=2e-4)
    np.testing.assert_allclose(logits[1, -1], alone[1], atol=2e-4)
    # One more token each, at each sequence's own position.
    nxt = [int(np.argmax(alone[0])), int(np.argmax(alone[1]))]
    both = batch.step([[nxt[0]], [nxt[1]]], [[len(short)], [len(long)]], [[1], [1]])
    for row, seq in enumerate((short, long)):
        single = Cached(session, smollm2.config, 1)
        single.step([seq], [range(len(seq))], [[1] * len(seq)])
        expected = single.step([[nxt[row]]], [[len(seq)]], [[1]])
        np.testing.assert_allclose(both[row, -1], expected[0, -1], atol=2e-4)


def test_logits_from_a_position_are_those_positions_logits(
    smollm2: GGUFModel, session: ort.InferenceSession
) -> None:
    ids = prompt_ids(smollm2, "Hi")
    past, _ = cache_names(smollm2.config.layers)
    feed: dict[str, Any] = {
        "input_ids": np.array([ids]),
        "position_ids": np.array([list(range(len(ids)))]),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "logits_from": np.array([len(ids) - 1]),
    }
    empty = (1, smollm2.config.kv_heads, 0, smollm2.config.head_dim)
    feed.update({name: np.zeros(empty, dtype=np.float32) for name in past})
    last = session.run(["logits"], feed)[0]
    every = Cached(session, smollm2.config, 1).step([ids], [range(len(ids))], [[1] * len(ids)])
    assert last.shape == (1, 1, smollm2.config.vocab)
    np.testing.assert_allclose(last[0, 0], every[0, -1], atol=1e-4)


def test_greedy_decoding_answers_the_question(
    smollm2: GGUFModel, session: ort.InferenceSession
) -> None:
    ids = prompt_ids(smollm2, "What is the capital of France?")
    cached = Cached(session, smollm2.config, 1)
    logits = cached.step([ids], [range(len(ids))], [[1] * len(ids)])
    out: list[int] = []
    while len(out) < 24:
        out.append(int(np.argmax(logits[0, -1])))
        if out[-1] == smollm2.eos_id:
            break
        position = len(ids) + len(out) - 1
        logits = cached.step([[out[-1]]], [[position]], [[1]])

    assert out[-1] == smollm2.eos_id
    assert smollm2.tokenizer().decode(out) == "The capital of France is Paris."
