"""A streamed chat completion: chunks as the openai SDK reads them, text held back where it may
still change (a split UTF-8 character, the start of a stop sequence), and reports that do not
continue the stream refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk

from idlefleet.workloads.chat import CHAT, encode_result
from idlefleet.workloads.chat.stream import ChatStream, held_back

MODEL = "SmolLM2-135M-Instruct"


def stream(stop: Any = None, include_usage: bool = False) -> ChatStream:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
    }
    if stop is not None:
        body["stop"] = stop
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    made = CHAT.stream_online(CHAT.plan(body))
    assert isinstance(made, ChatStream)
    return made


def progress(tokens: list[int]) -> bytes:
    return json.dumps({"tokens": tokens}).encode()


def text_of(events: list[dict[str, Any]]) -> str:
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize(
    ("text", "stops", "kept"),
    [
        ("Hello wor", [], "Hello wor"),
        ("Hello wor", ["world"], "Hello "),
        ("Hello world and more", ["world"], "Hello "),
        ("a\ufffd", [], "a"),
        ("end.", ["."], "end"),
        ("abc", ["x", "bcd"], "a"),
    ],
)
def test_held_back_keeps_only_what_cannot_change(text: str, stops: list[str], kept: str) -> None:
    assert held_back(text, stops) == kept


def test_a_plain_request_is_not_streamed() -> None:
    planned = CHAT.plan({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert CHAT.stream_online(planned) is None


def test_chunks_carry_the_text_as_it_grows_and_end_with_usage(smollm2: Any) -> None:
    tokenizer = smollm2.tokenizer()
    tokens = tokenizer.encode("Paris is the capital of France.", add_special_tokens=False).ids
    s = stream(include_usage=True)

    events = s.start()
    for n in range(1, len(tokens)):
        events += s.progress(progress(tokens[:n]))
    events += s.result(encode_result(tokens, tokenizer.decode(tokens), "stop", 9), 9 + len(tokens))

    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text_of(events) == "Paris is the capital of France."
    assert len(chunks) == 1 + len(tokens) + 2  # role, one per token, finish, usage
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_a_character_split_across_tokens_is_sent_whole(smollm2: Any) -> None:
    tokenizer = smollm2.tokenizer()
    tokens = tokenizer.encode("日本", add_special_tokens=False).ids
    s = stream()
    sent = [text_of(s.progress(progress(tokens[:n]))) for n in range(1, len(tokens) + 1)]
    assert "".join(sent) == "日本"
    assert all("\ufffd" not in part for part in sent)


def test_a_stop_sequence_is_never_streamed(smollm2: Any) -> None:
    tokenizer = smollm2.tokenizer()
    tokens = tokenizer.encode("One. Two. Three.", add_special_tokens=False).ids
    s = stream(stop=[" Two"])
    sent = "".join(text_of(s.progress(progress(tokens[:n]))) for n in range(1, len(tokens)))
    final = s.result(encode_result(tokens, "One.", "stop", 5), 5 + len(tokens))
    assert sent + text_of(final) == "One."


def test_a_report_that_does_not_continue_the_stream_is_refused(smollm2: Any) -> None:
    tokenizer = smollm2.tokenizer()
    tokens = tokenizer.encode("Good morning to you", add_special_tokens=False).ids
    s = stream()
    first = text_of(s.progress(progress(tokens[:3])))
    with pytest.raises(ValueError, match="do not continue"):
        s.progress(progress([tokens[0], tokens[2]]))
    with pytest.raises(ValueError, match="do not continue"):
        s.result(encode_result(tokens[1:], tokenizer.decode(tokens[1:]), "stop", 5), 9)
    # What was streamed is unchanged: the right continuation is still accepted.
    assert first + text_of(s.progress(progress(tokens))) == tokenizer.decode(tokens)
