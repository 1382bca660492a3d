"""Errors a client of the coordinator can see, and their OpenAI wire form.

Everything the OpenAI-compatible API refuses is raised as an ``IdlefleetError``. The error carries
what OpenAI puts on the wire (``message``, ``type``, ``param``, ``code``) plus the HTTP status, so
the API edge turns any of them into a response with ``to_openai()`` and the batch finaliser writes
the same body into an error-file line; no layer re-invents the shape. The class fixes the HTTP
status and the OpenAI ``type``; the instance carries the message, ``code`` and ``param``.

Hierarchy (status, OpenAI ``type``)::

    IdlefleetError                  500  server_error
    ├── InvalidRequest              400  invalid_request_error
    ├── Unauthorized                401  invalid_request_error
    ├── Forbidden                   403  invalid_request_error
    ├── NotFound                    404  invalid_request_error
    ├── Conflict                    409  invalid_request_error
    ├── PayloadTooLarge             413  invalid_request_error
    ├── RateLimited                 429  requests
    ├── InternalError               500  server_error
    └── ServiceUnavailable          503  server_error

``code`` is ``str | None``, not ``str``: OpenAI itself sends ``"code": null`` for several errors
(an empty embeddings input, an unrecognized argument), and we copy those responses exactly. The
types are OpenAI's: 4xx client errors are ``invalid_request_error`` (401 and 404 included, as
OpenAI does), 429 is ``requests`` and 5xx are ``server_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

__all__ = [
    "Conflict",
    "Forbidden",
    "IdlefleetError",
    "InternalError",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "array_too_long",
    "invalid_type",
    "json_kind",
    "missing_parameter",
    "model_of",
]


class IdlefleetError(Exception):
    """A failure with an OpenAI error body and an HTTP status."""

    http_status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        """Response headers to send with the error (a 429's ``x-ratelimit-*``)."""

    def to_openai(self) -> dict[str, dict[str, str | None]]:
        """The body OpenAI sends for this error: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, param={self.param!r})"


class InvalidRequest(IdlefleetError):
    """The request is malformed or asks for something we do not support (400)."""

    http_status = 400
    type = "invalid_request_error"


class Unauthorized(IdlefleetError):
    """Missing or wrong API key (401)."""

    http_status = 401
    type = "invalid_request_error"


class Forbidden(IdlefleetError):
    """A valid key whose role may not do this (403)."""

    http_status = 403
    type = "invalid_request_error"


class NotFound(IdlefleetError):
    """A model, file or batch that does not exist (404)."""

    http_status = 404
    type = "invalid_request_error"


class Conflict(IdlefleetError):
    """The object is in a state that forbids the operation, e.g. cancelling a done batch (409)."""

    http_status = 409
    type = "invalid_request_error"


class PayloadTooLarge(IdlefleetError):
    """An upload or request body over our size limit (413)."""

    http_status = 413
    type = "invalid_request_error"


class RateLimited(IdlefleetError):
    """Too many requests or too much queued work for now (429)."""

    http_status = 429
    type = "requests"


class InternalError(IdlefleetError):
    """A bug or broken invariant on our side (500)."""

    http_status = 500
    type = "server_error"


class ServiceUnavailable(IdlefleetError):
    """No capacity right now, e.g. no vehicle can take the work (503)."""

    http_status = 503
    type = "server_error"


def json_kind(value: object) -> str:
    """How OpenAI names a JSON value's type in "but got ... instead" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"


def invalid_type(param: str, expected: str, value: object) -> InvalidRequest:
    """OpenAI's 400 for a JSON value of the wrong type ("Invalid type for 'x': expected ...,
    but got ... instead.", code ``invalid_type``)."""
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_kind(value)} instead.",
        code="invalid_type",
        param=param,
    )


def missing_parameter(param: str) -> InvalidRequest:
    """OpenAI's 400 for an absent field ("Missing required parameter: 'x'.")."""
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param
    )


def array_too_long(param: str, limit: int, length: int) -> InvalidRequest:
    """OpenAI's 400 for an array over its maximum length (``array_above_max_length``)."""
    return InvalidRequest(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
        f"but got an array with length {length} instead.",
        code="array_above_max_length",
        param=param,
    )


def model_of(body: Mapping[str, object], canonical: Callable[[str], str | None]) -> str:
    """The canonical id of a body's ``model`` (``canonical`` resolves names and aliases), or
    OpenAI's error: 400 if absent or not a string, 404 ``model_not_found`` if not served."""
    name = body.get("model")
    if name is None:
        raise missing_parameter("model")
    if not isinstance(name, str):
        raise invalid_type("model", "a string", name)
    model = canonical(name)
    if model is None:
        raise NotFound(
            f"The model `{name}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return model
