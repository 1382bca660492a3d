"""Validation of an OpenAI ``/v1/embeddings`` request body into an ``EmbeddingJob``.

One function, ``validate_embedding_body``, serves both the online ``POST /v1/embeddings`` and each
request of a batch, so the two paths accept and refuse exactly the same bodies with the same
OpenAI error. It is pure: no I/O, no tokenizer, no model. The only model is ``all-MiniLM-L6-v2``
(384 dimensions); ``sentence-transformers/all-MiniLM-L6-v2`` is accepted as an alias and the job
always carries the canonical id, which is also what the response reports as ``model``.

What OpenAI does, and where we copy it exactly (checked against reports of real responses):

- empty input (``""``, ``[]``, or an empty string inside the list): 400
  ``'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.``
  with ``param`` and ``code`` null.
- unknown model: 404 ``model_not_found``, ``The model `x` does not exist or you do not have access
  to it.``
- unknown body fields: 400 ``Unrecognized request argument supplied: x`` (``arguments``, comma
  separated, for several), ``param`` and ``code`` null. The SDK only sends known fields, so this
  strictness costs real clients nothing and keeps us from silently ignoring a typo.

Where OpenAI differs from us or we could not verify, we decided:

- token arrays (``[1, 2]``, ``[[1, 2]]``) are refused with 400 ``unsupported_value`` on ``input``:
  OpenAI accepts them, but the ids are tiktoken ids and would mean other words to our WordPiece
  tokenizer. Refusing is better than embedding the wrong text.
- ``dimensions`` is accepted only as 384 (our native size, so a client that always sends it works);
  anything else is 400 ``unsupported_value``. OpenAI's text for fixed-size models is "This model
  does not support specifying dimensions." — ours names the one value we do support.
- more than 2048 inputs: 400 ``array_above_max_length`` in OpenAI's wording for arrays.
- wrong JSON types: 400 ``invalid_type`` ("Invalid type for 'x': expected ..., but got ...
  instead."), bad enum: 400 ``invalid_value`` ("Invalid value: 'x'. Supported values are: ...") and
  absent fields: 400 ``missing_required_parameter`` ("Missing required parameter: 'x'."), OpenAI's
  current style for these.
- whitespace-only strings are embedded, not refused: they are valid text for the model.
- ``encoding_format`` defaults to ``"float"`` as in OpenAI's API; note that the Python SDK sends
  ``"base64"`` unless told otherwise. ``null`` for an optional field means "not given".
- per-input token limits are not checked here: the model truncates at 256 word pieces, as
  sentence-transformers does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from idlefleet.coordinator.errors import (
    InvalidRequest,
    array_too_long,
    invalid_type,
    missing_parameter,
    model_of,
)
from idlefleet.models.catalog import MINILM, resolve_model

__all__ = [
    "EMBEDDING_DIMENSIONS",
    "MAX_BATCH_INPUTS",
    "MAX_INPUTS_PER_REQUEST",
    "MAX_REQUEST_INPUT_BYTES",
    "MODEL_ID",
    "EmbeddingJob",
    "canonical_model",
    "validate_embedding_body",
]

# The model catalogue is the one source of model ids and shapes; these name its only entry.
MODEL_ID = MINILM.id
EMBEDDING_DIMENSIONS = MINILM.dim
MAX_INPUTS_PER_REQUEST = 2048
MAX_BATCH_INPUTS = 50_000
"""OpenAI limits a ``/v1/embeddings`` batch to 50,000 inputs over all its requests."""
MAX_REQUEST_INPUT_BYTES = 2 * 1024 * 1024
"""A request's inputs, in UTF-8 bytes: well inside one NATS message (8 MiB in the embedded
server), since a request is never split across cars. OpenAI's own bound is 300,000 tokens
per request, about 1.2 MB of English text."""
_KNOWN_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_EMPTY_INPUT_MESSAGE = (
    "'$.input' is invalid. Please check the API reference: "
    "https://platform.openai.com/docs/api-reference."
)

EncodingFormat = Literal["float", "base64"]


@dataclass(frozen=True, slots=True)
class EmbeddingJob:
    """A validated embeddings request, ready to be split into work for the fleet."""

    model: str
    """Canonical model id (aliases resolved), echoed as ``model`` in the response."""
    texts: tuple[str, ...]
    """The inputs in request order; never empty, no empty strings, at most 2048."""
    encoding_format: EncodingFormat = "float"
    """How the response encodes vectors: JSON floats or base64 of little-endian float32."""
    single: bool = False
    """The input was one string rather than a list (the response is a one-item list either way)."""


def canonical_model(name: str) -> str | None:
    """The canonical id for a model name or alias, or None if we do not serve it."""
    info = resolve_model(name, "embeddings")
    return info.id if info else None


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _looks_like_tokens(items: list[object]) -> bool:
    if all(_is_token_id(item) for item in items):
        return True
    return all(
        isinstance(item, list) and item and all(_is_token_id(tok) for tok in item) for item in items
    )


def _validate_input(body: Mapping[str, object]) -> tuple[tuple[str, ...], bool]:
    if "input" not in body or body["input"] is None:
        raise missing_parameter("input")
    value = body["input"]
    if isinstance(value, str):
        if not value:
            raise InvalidRequest(_EMPTY_INPUT_MESSAGE)
        _check_input_bytes([value])
        return (value,), True
    if not isinstance(value, list):
        raise invalid_type("input", "a string or an array of strings", value)
    if not value:
        raise InvalidRequest(_EMPTY_INPUT_MESSAGE)
    if len(value) > MAX_INPUTS_PER_REQUEST:
        raise array_too_long("input", MAX_INPUTS_PER_REQUEST, len(value))
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(_EMPTY_INPUT_MESSAGE)
            continue
        if _looks_like_tokens(value):
            raise InvalidRequest(
                f"Token arrays are not supported for model '{MODEL_ID}': its tokenizer is not "
                "OpenAI's, so the token ids would stand for other words. Send the text as a "
                "string or an array of strings.",
                code="unsupported_value",
                param="input",
            )
        raise invalid_type(f"input[{index}]", "a string", item)
    _check_input_bytes(value)
    return tuple(value), False


def _check_input_bytes(texts: list[str]) -> None:
    """A request travels to a car as one NATS message: its text must fit, with room to spare."""
    total = sum(len(t) for t in texts)  # characters: a lower bound of the UTF-8 bytes
    if total * 4 > MAX_REQUEST_INPUT_BYTES:
        total = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if total > MAX_REQUEST_INPUT_BYTES:
        raise InvalidRequest(
            f"Invalid 'input': the inputs of a request may total at most "
            f"{MAX_REQUEST_INPUT_BYTES} bytes of UTF-8 text, but these total {total}. The model "
            f"reads at most {MINILM.max_tokens} tokens of each input; split the request.",
            code="input_too_large",
            param="input",
        )


def _validate_encoding_format(body: Mapping[str, object]) -> EncodingFormat:
    value = body.get("encoding_format")
    if value is None:
        return "float"
    if not isinstance(value, str):
        raise invalid_type("encoding_format", "a string", value)
    if value == "float":
        return "float"
    if value == "base64":
        return "base64"
    raise InvalidRequest(
        f"Invalid value: '{value}'. Supported values are: 'float' and 'base64'.",
        code="invalid_value",
        param="encoding_format",
    )


def _validate_dimensions(body: Mapping[str, object]) -> None:
    value = body.get("dimensions")
    if value is None:
        return
    if not _is_token_id(value):
        raise invalid_type("dimensions", "an integer", value)
    if value != EMBEDDING_DIMENSIONS:
        raise InvalidRequest(
            f"This model does not support specifying dimensions other than {EMBEDDING_DIMENSIONS}.",
            code="unsupported_value",
            param="dimensions",
        )


def validate_embedding_body(body: object) -> EmbeddingJob:
    """Check an embeddings request body; return the job or raise the error OpenAI would send.

    Raises ``InvalidRequest`` (400) for a malformed body and ``NotFound`` (404, code
    ``model_not_found``) for a model we do not serve. Checks run in a fixed order (unknown fields,
    model, input, encoding_format, dimensions, user) and the first failure is raised.
    """
    if not isinstance(body, dict):
        raise invalid_type("body", "an object", body)
    unknown = sorted(key for key in body if key not in _KNOWN_FIELDS)
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        raise InvalidRequest(f"Unrecognized request {noun} supplied: {', '.join(unknown)}")
    model = model_of(body, canonical_model)
    texts, single = _validate_input(body)
    encoding_format = _validate_encoding_format(body)
    _validate_dimensions(body)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_type("user", "a string", user)
    return EmbeddingJob(model=model, texts=texts, encoding_format=encoding_format, single=single)
