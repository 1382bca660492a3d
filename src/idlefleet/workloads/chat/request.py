"""Validation of an OpenAI ``/v1/chat/completions`` body into a ``ChatJob``.

One function, ``validate_chat_body``, serves the online endpoint and each batch line, so both
accept and refuse the same bodies with the same OpenAI error. Pure: no tokenizer, no model (the
prompt's length against the context window is checked where the tokenizer is, by the workload).

What we accept, with OpenAI's shapes:

- ``model`` (required; the catalogue's id or an alias), ``messages`` (required, non-empty): each
  ``{"role", "content", "name"?}``; roles ``system``, ``developer`` (as system), ``user``,
  ``assistant``; content a string or a list of ``{"type": "text", "text": ...}`` parts (joined).
- ``max_completion_tokens`` or the older ``max_tokens`` (≥ 1; the newer wins when both come),
  ``temperature`` [0, 2] (default 1), ``top_p`` (0, 1] (default 1), ``seed`` (integer),
  ``stop`` (a string or up to 4 strings), ``stream`` (bool), ``stream_options``
  (``{"include_usage": bool}``, only with ``stream``), ``n`` (1 only), ``user``,
  ``frequency_penalty`` / ``presence_penalty`` (0 only), ``logprobs`` (false only).

Refused with 400 (OpenAI's ``type`` and our wording where OpenAI's is not known): unknown fields
(``Unrecognized request argument supplied``), wrong JSON types (``invalid_type``), values out of
range (``invalid_value`` / ``integer_below_min_value``), missing fields
(``missing_required_parameter``), ``messages`` empty (``empty_array``), image or audio parts
(``unsupported_value``: this model reads text only), the ``tool`` role, tools and response
formats (``unsupported_parameter``), ``n`` > 1 (``unsupported_value``). An unknown model is 404
``model_not_found``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from idlefleet.coordinator.errors import (
    InvalidRequest,
    array_too_long,
    invalid_type,
    missing_parameter,
    model_of,
)

__all__ = ["MAX_STOP_SEQUENCES", "ChatJob", "validate_chat_body"]

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_KNOWN = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "user",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
    }
)
_UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "logit_bias",
        "top_logprobs",
        "audio",
        "modalities",
        "prediction",
        "parallel_tool_calls",
    }
)


@dataclass(frozen=True)
class ChatJob:
    """A validated chat completion request."""

    model: str
    messages: tuple[tuple[str, str], ...]
    """(role, text) in order; roles ``system``, ``user``, ``assistant``."""
    max_tokens: int | None
    """Completion tokens at most; None: up to the context window."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid_type(name, "a number", value)
    if not low <= value <= high:  # NaN too (json.loads reads it)
        raise InvalidRequest(
            f"Invalid '{name}': {value} is out of range; it must be between {low} and {high}.",
            code="invalid_value",
            param=name,
        )
    return float(value)


def _content(message: Mapping[str, Any], index: int) -> str:
    param = f"messages[{index}].content"
    content = message.get("content")
    if content is None:
        raise missing_parameter(param)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_type(param, "a string or an array of content parts", content)
    texts = []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        if not isinstance(part, dict):
            raise invalid_type(where, "an object", part)
        kind = part.get("type")
        if kind != "text":
            if kind in ("image_url", "input_audio", "file", "input_image"):
                raise InvalidRequest(
                    f"Invalid '{where}': content parts of type '{kind}' are not supported; "
                    "this model reads text only.",
                    code="unsupported_value",
                    param=f"{where}.type",
                )
            raise InvalidRequest(
                f"Invalid value: '{kind}'. Supported values are: 'text'.",
                code="invalid_value",
                param=f"{where}.type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid_type(f"{where}.text", "a string", text)
        texts.append(text)
    return "".join(texts)


def _messages(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    value = body.get("messages")
    if value is None:
        raise missing_parameter("messages")
    if not isinstance(value, list):
        raise invalid_type("messages", "an array", value)
    if not value:
        raise InvalidRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            code="empty_array",
            param="messages",
        )
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid_type(f"messages[{i}]", "an object", message)
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: messages[{i}].{unknown[0]}",
                param=f"messages[{i}].{unknown[0]}",
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid_type(f"messages[{i}].role", "a string", role)
        if role not in _ROLES:
            supported = ", ".join(f"'{r}'" for r in _ROLES)
            raise InvalidRequest(
                f"Invalid value: '{role}'. Supported values are: {supported}.",
                code="invalid_value" if role != "tool" else "unsupported_value",
                param=f"messages[{i}].role",
            )
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid_type(f"messages[{i}].name", "a string", name)
        out.append((_ROLES[role], _content(message, i)))
    return tuple(out)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise invalid_type(name, "an integer", value)
        if value < 1:
            raise InvalidRequest(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got "
                f"{value} instead.",
                code="integer_below_min_value",
                param=name,
            )
        return int(value)
    return None


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise invalid_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP_SEQUENCES:
        raise array_too_long("stop", MAX_STOP_SEQUENCES, len(items))
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise invalid_type(f"stop[{k}]", "a string", item)
        if not item or len(item) > MAX_STOP_CHARS:
            raise InvalidRequest(
                f"Invalid 'stop[{k}]': a stop sequence has 1 to {MAX_STOP_CHARS} characters.",
                code="invalid_value",
                param=f"stop[{k}]",
            )
    return tuple(items)


def validate_chat_body(body: object, canonical_model: Any) -> ChatJob:
    """Check a chat completions body; return the job or raise the error OpenAI would send.

    ``canonical_model(name)`` gives the served id of a model name or alias, or None. Checks run
    in a fixed order (fields, model, messages, sampling, stop, stream) and the first failure is
    raised.
    """
    if not isinstance(body, dict):
        raise invalid_type("body", "an object", body)
    unsupported = sorted(key for key in body if key in _UNSUPPORTED)
    if unsupported:
        raise InvalidRequest(
            f"Unsupported parameter: '{unsupported[0]}' is not supported with this model.",
            code="unsupported_parameter",
            param=unsupported[0],
        )
    unknown = sorted(key for key in body if key not in _KNOWN)
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        raise InvalidRequest(f"Unrecognized request {noun} supplied: {', '.join(unknown)}")
    model = model_of(body, canonical_model)
    messages = _messages(body)
    max_tokens = _max_tokens(body)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise InvalidRequest(
            "Invalid 'top_p': 0 is out of range; it must be greater than 0 and at most 1.",
            code="invalid_value",
            param="top_p",
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise invalid_type("seed", "an integer", seed)
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise invalid_type("n", "an integer", n)
        if n != 1:
            raise InvalidRequest(
                f"Invalid 'n': {n} completions per request are not supported; send 1 (or "
                "several requests).",
                code="unsupported_value",
                param="n",
            )
    for penalty in ("frequency_penalty", "presence_penalty"):
        value = body.get(penalty)
        if value is not None:
            if not _is_number(value):
                raise invalid_type(penalty, "a number", value)
            if value != 0:
                raise InvalidRequest(
                    f"Invalid '{penalty}': only 0 is supported by this service.",
                    code="unsupported_value",
                    param=penalty,
                )
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, bool):
            raise invalid_type("logprobs", "a boolean", logprobs)
        if logprobs:
            raise InvalidRequest(
                "Invalid 'logprobs': log probabilities are not supported by this service.",
                code="unsupported_value",
                param="logprobs",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_type("user", "a string", user)
    stop = _stop(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_type("stream", "a boolean", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                code="invalid_value",
                param="stream_options",
            )
        if not isinstance(options, dict):
            raise invalid_type("stream_options", "an object", options)
        extra = sorted(set(options) - {"include_usage"})
        if extra:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: stream_options.{extra[0]}",
                param=f"stream_options.{extra[0]}",
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise invalid_type("stream_options.include_usage", "a boolean", usage)
        include_usage = bool(usage)
    return ChatJob(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else int(seed),
        stop=stop,
        stream=bool(stream),
        include_usage=include_usage,
    )
