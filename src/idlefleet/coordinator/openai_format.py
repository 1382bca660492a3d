"""OpenAI wire shapes for embeddings results, batch output/error lines and object ids.

Pure formatting, no I/O: the API edge and the batch finaliser call these so that what a client
reads parses with the official SDK types (``CreateEmbeddingResponse``, ``Batch.errors``) exactly
as OpenAI's own responses do.

Shapes (OpenAI's, as documented and as seen in real files):

- embeddings response: ``{"object": "list", "data": [{"object": "embedding", "index": i,
  "embedding": [...] | "<base64>"}], "model": ..., "usage": {"prompt_tokens", "total_tokens"}}``;
  base64 is of the little-endian float32 bytes, which is how the SDK decodes it.
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

Floats. A float32 printed via ``float(x)`` shows its exact binary value (``0.10000000149011612``,
~19 characters). We print instead the shortest decimal that reads back as the same float32
(``0.1``), found arithmetically for the whole matrix at once: round in float64 to 6, 7, 8 and 9
significant digits and keep, per value, the fewest digits that convert back to the identical
float32 (a value whose shortest form is under 6 digits rounds to it at 6; ``repr`` drops the
zeros). Each kept value is the float64 nearest that short decimal, so ``json`` prints the short
form. Magnitudes outside 1e-14..1e6, where some power of ten needed is not exact, fall back to
numpy's per-value shortest formatting (rare in unit-length embeddings). Every value is checked,
so a float64 JSON reader always gets back the identical float32. Non-finite values raise
``ValueError``: JSON has no NaN.

Speed, on the 2-core dev machine (busy, best of 9), per unit-length 384-vector: ~37 µs to shorten
and ~155 µs for the whole output line, ``json`` printing the floats dominating; the exact form
takes ~170-210 µs and ~60% more bytes (~8.1 kB against ~5.0 kB). numpy's own string formatting
was slower than both. base64 takes ~8 µs.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from idlefleet.coordinator.batch_input import BatchFileError
from idlefleet.coordinator.errors import IdlefleetError

__all__ = [
    "BATCH_CANCELLED",
    "BATCH_EXPIRED",
    "BATCH_ID_PREFIX",
    "BATCH_REQUEST_ID_PREFIX",
    "FILE_ID_PREFIX",
    "batch_errors_object",
    "cancelled_line",
    "derived_id",
    "embedding_body_json",
    "embedding_response",
    "error_line",
    "expired_line",
    "new_id",
    "new_request_id",
    "output_line",
    "output_line_json",
    "request_error_line",
    "shortest_float32",
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
# 10**k is exact in float64 up to k = 22, which keeps the rounding division correctly rounded.
_POWERS_OF_TEN = 10.0 ** np.arange(23)
# A float32 needs at most 9 significant digits; fewer than 6 are covered by 6 (repr drops zeros).
_DIGITS = np.arange(6, 10)[:, np.newaxis]


# Base62 two digits at a time (least significant first, as one digit at a time would): every
# output line of a batch gets two ids, and this halves their cost.
_ID_PAIRS = [_ID_ALPHABET[v % 62] + _ID_ALPHABET[v // 62] for v in range(62 * 62)]


def _base62(number: int) -> str:
    pairs = []
    for _ in range(_ID_LENGTH // 2):
        number, pair = divmod(number, 3844)
        pairs.append(_ID_PAIRS[pair])
    return "".join(pairs)


def new_id(prefix: str) -> str:
    """A random OpenAI-style id: ``prefix`` + 24 base62 characters (~143 bits)."""
    # One draw of 18 random bytes, not 24 draws of one character: ids are made per output line.
    return prefix + _base62(int.from_bytes(secrets.token_bytes(18), "big"))


def derived_id(prefix: str, *parts: object) -> str:
    """A stable OpenAI-style id derived from ``parts`` (same parts, same id).

    Used for the ``batch_req_`` ids of output lines, so that rendering a batch's files again
    (after a crash in finalisation) gives the same bytes.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=18).digest()
    return prefix + _base62(int.from_bytes(digest, "big"))


def new_request_id() -> str:
    """A random 32-hex-digit id, the form of OpenAI's ``response.request_id``."""
    return secrets.token_hex(16)


def shortest_float32(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """float64 values that print (``repr``/``json``) as the shortest decimals of ``values``.

    Every result converts back to exactly the input float32; see the module docstring.
    """
    v32 = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if not np.isfinite(v32).all():
        raise ValueError("embedding contains NaN or infinity, which JSON cannot carry")
    x = v32.astype(np.float64)
    magnitude = np.abs(x)
    # Zeros get exponent 0 and round to themselves (sign included).
    exponent = np.floor(np.log10(np.where(magnitude == 0.0, 1.0, magnitude))).astype(np.int64)
    # All candidate precisions at once, one row each: a few large numpy calls beat many small
    # ones for the common single-vector response (~2x faster than a pass per precision).
    k = _DIGITS - 1 - exponent
    # 10**k must be exact (0 <= k <= 22) for every candidate precision, or the fewest-digits
    # choice could skip a shorter form: that holds for 1e-14 <= |x| < 1e6.
    in_range = (exponent >= -14) & (exponent <= 5)
    scale = _POWERS_OF_TEN[np.clip(k, 0, 22)]
    rounded = np.rint(x * scale) / scale
    good = in_range & (rounded.astype(np.float32) == v32)
    shortest = good.argmax(axis=0)
    columns = np.arange(x.size)
    found = good[shortest, columns]
    out = np.where(found, rounded[shortest, columns], x)
    # Other magnitudes are rare enough in embeddings to take numpy's per-value shortest form.
    for i in np.flatnonzero(~found):
        short = float(str(v32[i]))
        if np.float32(short) == v32[i]:
            out[i] = short
    return out.reshape(np.shape(values))


def embedding_response(
    job_model: str,
    vectors: npt.NDArray[np.float32],
    token_counts: Sequence[int],
    encoding_format: Literal["float", "base64"],
) -> dict[str, Any]:
    """An OpenAI ``CreateEmbeddingResponse`` body for ``vectors`` (shape ``[n, dims]``)."""
    matrix = np.asarray(vectors)
    if matrix.ndim != 2 or matrix.shape[0] != len(token_counts):
        raise ValueError(
            f"vectors of shape {matrix.shape} do not match {len(token_counts)} token counts"
        )
    rows = _encoded_rows(matrix, encoding_format)
    return _embedding_body(job_model, rows, int(sum(token_counts)))


def _encoded_rows(matrix: npt.NDArray[np.float32], encoding_format: str) -> list[Any]:
    if encoding_format == "float":
        return list(shortest_float32(matrix).tolist())
    if encoding_format == "base64":
        if not np.isfinite(matrix).all():
            raise ValueError("embedding contains NaN or infinity")
        little = np.ascontiguousarray(matrix, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    raise ValueError(f"unknown encoding_format {encoding_format!r}")


def _embedding_body(job_model: str, rows: Sequence[Any], tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": row}
            for index, row in enumerate(rows)
        ],
        "model": job_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def embedding_body_json(
    job_model: str,
    vectors: npt.NDArray[np.float32],
    token_counts: Sequence[int],
    encoding_format: Literal["float", "base64"],
) -> bytes:
    """:func:`embedding_response` as compact UTF-8 JSON, ready for :func:`output_line_json`."""
    return _jsonl(embedding_response(job_model, vectors, token_counts, encoding_format))[:-1]


def embedding_bodies_json(
    models: Sequence[str],
    vectors: npt.NDArray[np.float32],
    vector_counts: Sequence[int],
    token_counts: Sequence[int],
    encoding_formats: Sequence[str],
) -> list[bytes]:
    """The response bodies of several requests whose vectors lie one after another in
    ``vectors`` (request ``i`` of ``models[i]`` has ``vector_counts[i]`` rows and
    ``token_counts[i]`` tokens).

    Each body is what :func:`embedding_body_json` gives for its rows; the rows of every
    encoding are converted in one numpy pass for them all, which is most of the cost.
    """
    n = len(models)
    if not len(vector_counts) == len(token_counts) == len(encoding_formats) == n:
        raise ValueError("models, counts and encoding_formats differ in length")
    if sum(vector_counts) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors for {sum(vector_counts)} counted")
    encoded = {fmt: _batch_rows(vectors, fmt) for fmt in set(encoding_formats)}
    bodies = []
    row = 0
    for model, count, tokens, fmt in zip(
        models, vector_counts, token_counts, encoding_formats, strict=True
    ):
        body = _embedding_body(model, encoded[fmt][row : row + count], int(tokens))
        bodies.append(_jsonl(body)[:-1])
        row += count
    return bodies


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


def _batch_rows(matrix: npt.NDArray[np.float32], encoding_format: str) -> list[Any]:
    """Rows for a batch's bodies: float rows stay float32 arrays, which orjson prints in their
    shortest round-tripping decimal form itself (ryu's f2s), ~14x faster than
    :func:`shortest_float32` and the same values digit for digit; it writes some magnitudes
    below 1e-4 positionally (0.0000046918676) where :func:`shortest_float32` gives an exponent
    (4.6918676e-06), both the same float32. The online response keeps the lists."""
    if encoding_format != "float":
        return _encoded_rows(matrix, encoding_format)
    if not np.isfinite(matrix).all():
        raise ValueError("embedding contains NaN or infinity, which JSON cannot carry")
    return list(np.ascontiguousarray(matrix, dtype=np.float32))


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
