"""Chat completion bodies: what is accepted, and OpenAI's error for what is not."""

from __future__ import annotations

from typing import Any

import pytest

from idlefleet.coordinator.errors import InvalidRequest, NotFound
from idlefleet.workloads.chat.request import ChatJob, validate_chat_body

MODEL = "SmolLM2-135M-Instruct"


def canonical(name: str) -> str | None:
    return MODEL if name in (MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct") else None


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


def check(**fields: Any) -> ChatJob:
    return validate_chat_body(body(**fields), canonical)


def refused(payload: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        validate_chat_body(payload, canonical)
    return caught.value


def test_a_minimal_body_gets_openais_defaults() -> None:
    assert check() == ChatJob(model=MODEL, messages=(("user", "Hi"),), max_tokens=None)


def test_every_supported_field_is_read() -> None:
    job = validate_chat_body(
        {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                    "name": "ann",
                },
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
            ],
            "max_completion_tokens": 20,
            "max_tokens": 99,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 42,
            "stop": ["\n\n", "END"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "user": "u-1",
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "logprobs": False,
        },
        canonical,
    )
    assert job == ChatJob(
        model=MODEL,
        messages=(
            ("system", "Be brief."),
            ("user", "Hi there"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ),
        max_tokens=20,
        temperature=0.5,
        top_p=0.9,
        seed=42,
        stop=("\n\n", "END"),
        stream=True,
        include_usage=True,
    )
    assert check(stop="###").stop == ("###",)
    assert check(max_tokens=7).max_tokens == 7


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"messages": []}, "empty_array", "messages"),
        ({"messages": "hi"}, "invalid_type", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_value", "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unsupported_value", "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "missing_required_parameter", "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "unsupported_value",
            "messages[0].content[0].type",
        ),
        ({"max_tokens": 0}, "integer_below_min_value", "max_tokens"),
        ({"max_completion_tokens": -3}, "integer_below_min_value", "max_completion_tokens"),
        ({"max_tokens": 2.5}, "invalid_type", "max_tokens"),
        ({"temperature": 2.5}, "invalid_value", "temperature"),
        ({"temperature": "hot"}, "invalid_type", "temperature"),
        ({"temperature": float("nan")}, "invalid_value", "temperature"),
        ({"top_p": 0}, "invalid_value", "top_p"),
        ({"top_p": 1.5}, "invalid_value", "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "array_above_max_length", "stop"),
        ({"stop": [1]}, "invalid_type", "stop[0]"),
        ({"stop": [""]}, "invalid_value", "stop[0]"),
        ({"n": 2}, "unsupported_value", "n"),
        ({"seed": "x"}, "invalid_type", "seed"),
        ({"stream": "yes"}, "invalid_type", "stream"),
        ({"stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
        ({"frequency_penalty": 0.5}, "unsupported_value", "frequency_penalty"),
        ({"logprobs": True}, "unsupported_value", "logprobs"),
        ({"tools": []}, "unsupported_parameter", "tools"),
    ],
)
def test_bad_fields_get_openais_error(fields: dict[str, Any], code: str, param: str) -> None:
    error = refused(body(**fields))
    assert (error.code, error.param, error.http_status) == (code, param, 400)
    assert error.to_openai()["error"]["type"] == "invalid_request_error"


def test_missing_and_unknown_fields() -> None:
    assert refused({"messages": [{"role": "user", "content": "x"}]}).param == "model"
    assert refused({"model": MODEL}).param == "messages"
    error = refused(body(temprature=1))
    assert error.message == "Unrecognized request argument supplied: temprature"
    assert refused([1, 2]).code == "invalid_type"


def test_an_unknown_model_is_404() -> None:
    with pytest.raises(NotFound) as caught:
        validate_chat_body(body(model="gpt-9"), canonical)
    assert caught.value.code == "model_not_found" and caught.value.http_status == 404
