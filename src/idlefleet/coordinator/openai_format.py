"""OpenAI wire shapes for batch output/error lines and object ids.

Pure formatting, no I/O: the API edge and the batch finaliser call these so that what a client
reads parses with the official SDK types (``BatchRequestOutput``, ``Batch.errors``) exactly
as OpenAI's own responses do.

Shapes (OpenAI's, as documented and as seen in real files):

- batch output line: ``{"id": "batch_req_...", "custom_id": ..., "response": {"status_code",
  "request_id", "body"}, "error": null}``. A request that ran and was refused (4xx) has the same
  shape with the OpenAI error body and goes to the error file, as OpenAI does.
- a request that never ran: ``{"id", "custom_id", "response": null, "error": {"code",
  "message"}}`` with ``batch_expired`` and OpenAI's text "This request could not be executed
  before the completion window expired."; ``batch_cancelled`` is a documented code, its wording is
  ours.
- a failed batch's ``errors``: ``{"object": "list", "data": [{"code", "message", "param",
  "line"}]}``.
- ids: ``file-``, ``batch_``, ``batch_req_`` + 24 random base62 characters (URL-safe, like
  OpenAI's), and a 32-hex ``request_id`` like OpenAI's ``x-request-id``.

Embeddings bodies are the workload's (``idlefleet.workloads.embeddings.render``).
"""

from __future__ import annotations

import hashlib
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from idlefleet.coordinator.errors import IdlefleetError

if TYPE_CHECKING:
    from idlefleet.coordinator.batch_input import BatchFileError

__all__ = [
    "BATCH_CANCELLED",
    "BATCH_EXPIRED",
    "BATCH_ID_PREFIX",
    "BATCH_REQUEST_ID_PREFIX",
    "FILE_ID_PREFIX",
    "batch_errors_object",
    "cancelled_line",
    "derived_id",
    "error_line",
    "expired_line",
    "new_id",
    "new_request_id",
    "output_line",
    "output_line_json",
    "request_error_line",
]

FILE_ID_PREFIX = "file-"
BATCH_ID_PREFIX = "batch_"
BATCH_REQUEST_ID_PREFIX = "batch_req_"

BATCH_EXPIRED = (
    "batch_expired",
    "This request could not be executed before the completion window expired.",
)
BATCH_CANCELLED = (
    "batch_cancelled",
    "This request was not executed because the batch was cancelled.",
)

_ID_ALPHABET = string.ascii_letters + string.digits
_ID_LENGTH = 24


# Each byte of a random draw or a digest becomes one base62 character (byte % 62, one
# ``bytes.translate`` for the whole id): 24 bytes give 24 characters of ~5.94 bits each, ~143
# bits in all (the residues 0-7 are a little likelier: 5/256 against 4/256). Every output line of
# a batch gets two ids; a derived one takes 1.2 µs this way, 2.3 µs by base62 division.
_TO_BASE62 = bytes.maketrans(
    bytes(range(256)), bytes(ord(_ID_ALPHABET[b % 62]) for b in range(256))
)


def new_id(prefix: str) -> str:
    """A random OpenAI-style id: ``prefix`` + 24 base62 characters (~143 bits)."""
    return prefix + secrets.token_bytes(_ID_LENGTH).translate(_TO_BASE62).decode("ascii")


def derived_id(prefix: str, *parts: object) -> str:
    """A stable OpenAI-style id derived from ``parts`` (same parts, same id).

    Used for the ``batch_req_`` ids of output lines, so that rendering a batch's files again
    (after a crash in finalisation) gives the same bytes.
    """
    key = "\x1f".join(map(str, parts)).encode()
    digest = hashlib.blake2b(key, digest_size=_ID_LENGTH).digest()
    return prefix + digest.translate(_TO_BASE62).decode("ascii")


def new_request_id() -> str:
    """A random 32-hex-digit id, the form of OpenAI's ``response.request_id``."""
    return secrets.token_hex(16)


def output_line_json(
    request_id: str, custom_id: str, status_code: int, body_json: bytes, response_request_id: str
) -> bytes:
    """:func:`output_line` around a body that is already JSON (rendered when it arrived)."""
    head = _jsonl(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": response_request_id},
        }
    )
    # head ends with '}}\n': open the response object again to append the body.
    return head[:-3] + b',"body":' + body_json + b'},"error":null}\n'


def _jsonl(obj: Mapping[str, Any]) -> bytes:
    # Compact and UTF-8 (one byte per separator saved is ~19 MB on a full 50,000-input batch).
    # orjson prints the same shortest float reprs as json, ~6x faster, which matters when every
    # result of a batch is rendered on the coordinator. It writes NaN as null where json would
    # refuse, so non-finite values are refused before they get here (shortest_float32,
    # _batch_rows). float32 arrays (a batch's rows) it prints in their shortest form itself.
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


def output_line(
    request_id: str,
    custom_id: str,
    status_code: int,
    body: Mapping[str, Any],
    *,
    response_request_id: str | None = None,
) -> bytes:
    """One JSONL line (newline included) for a request that ran.

    ``request_id`` is the line's ``id`` (``batch_req_...``); ``response_request_id`` fills
    ``response.request_id`` and is random when not given.
    """
    return _jsonl(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": {
                "status_code": status_code,
                "request_id": response_request_id or new_request_id(),
                "body": body,
            },
            "error": None,
        }
    )


def request_error_line(
    request_id: str,
    custom_id: str,
    error: IdlefleetError,
    *,
    response_request_id: str | None = None,
) -> bytes:
    """The error-file line for a request refused with ``error`` (status and OpenAI error body)."""
    return output_line(
        request_id,
        custom_id,
        error.http_status,
        error.to_openai(),
        response_request_id=response_request_id,
    )


def error_line(request_id: str, custom_id: str, code: str, message: str) -> bytes:
    """The error-file line for a request that never ran (``response`` is null)."""
    return _jsonl(
        {
            "id": request_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def expired_line(request_id: str, custom_id: str) -> bytes:
    """Error-file line for a request left unrun when the completion window closed."""
    return error_line(request_id, custom_id, *BATCH_EXPIRED)


def cancelled_line(request_id: str, custom_id: str) -> bytes:
    """Error-file line for a request left unrun because the batch was cancelled."""
    return error_line(request_id, custom_id, *BATCH_CANCELLED)


def batch_errors_object(errors: Sequence[BatchFileError]) -> dict[str, Any]:
    """A failed batch's ``errors`` field: ``{"object": "list", "data": [...]}``."""
    return {"object": "list", "data": [error.to_openai() for error in errors]}
