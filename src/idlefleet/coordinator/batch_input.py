"""Validation of a Batch API input file (JSONL) into runnable requests or a failed-batch verdict.

``parse_batch_input`` reads the whole uploaded file once, while the batch is ``validating``, and
sorts every problem into one of two kinds, as OpenAI does: file-level problems fail the batch with
an ``errors`` list (``BatchFileError``, 1-based ``line``); request-level problems (anything wrong
inside an otherwise well-formed ``body``) ride along on the request as an ``IdlefleetError`` whose
body the finaliser writes to the error file, while the rest of the batch completes. It is pure: no
I/O, no model.

File-level (the batch fails; codes and messages copied from real OpenAI responses where marked *):

- ``invalid_json_line``* "This line is not parseable as valid JSON." — also for a line that is not
  UTF-8 (with its own message) and for ``NaN``/``Infinity``, which are not JSON.
- ``invalid_request`` "Each line must be a JSON object." for a line that is JSON but not an object.
- ``missing_required_parameter``* "Missing required parameter: 'custom_id'." (and ``method``,
  ``url``, ``body``), ``param`` = the field.
- ``invalid_type`` when one of those four has the wrong JSON type.
- ``duplicate_custom_id`` (a documented OpenAI code; our wording) on the second occurrence.
- ``invalid_value`` when ``method`` is not ``"POST"``.
- ``invalid_url``* "The URL provided for this request does not match the batch endpoint."
- ``invalid_request``* "Model parameter is required." (``param`` ``body.model``) and
  ``invalid_type`` for a non-string ``body.model``.
- ``model_not_found``* "The provided model 'x' is not supported by the Batch API." OpenAI checks
  the model while validating the file and fails the whole batch, so we do too; the online endpoint
  answers the same mistake with a 404 instead.
- ``empty_file`` (documented code; our wording) when there is no request at all.
- ``too_many_tasks`` (documented code; our wording) for more than ``max_requests`` requests, or
  more than ``max_inputs`` inputs summed over the valid requests (the workload's
  ``max_batch_inputs``: OpenAI limits ``/v1/embeddings`` batches to 50,000 inputs).

Request-level: everything the batch endpoint's workload refuses once the model is known
(``Workload.plan``; for embeddings: empty or ill-typed ``input``, token arrays, more than 2048
inputs, bad ``encoding_format`` or ``dimensions``, unknown fields); the request gets ``error``
instead of ``planned``. Text in the body
that is JSON but not Unicode (an unpaired surrogate escape, ``text_check``) is request-level too
(``invalid_value``, ``param`` its path); in ``custom_id``, ``method``, ``url`` or ``body.model``
it is a file-level ``invalid_value`` (there is no custom_id to report it under, or the model
is part of the file's verdict).

Decisions where OpenAI is silent: blank (whitespace-only) lines are skipped but still counted, so
``line`` always matches the editor; ``\\r\\n`` endings and a leading UTF-8 byte-order mark are
accepted; each line reports only its first problem; at most ``MAX_REPORTED_ERRORS`` errors are
listed, then scanning stops; a file over ``max_requests`` is refused with a single error before
any line is parsed; ``model_mismatch`` cannot happen while we serve one model (aliases resolve to
it), so it is never emitted; the 200 MB upload limit belongs to the file upload, not here. When
``errors`` is non-empty, ``requests`` is empty, so a failed batch cannot be run by mistake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

from idlefleet.coordinator.errors import IdlefleetError, InvalidRequest, json_kind
from idlefleet.coordinator.text_check import (
    may_hold_surrogates,
    surrogate_message,
    unpaired_surrogate,
)
from idlefleet.workloads import WORKLOADS, Workload, by_endpoint
from idlefleet.workloads.base import Planned

__all__ = [
    "MAX_REPORTED_ERRORS",
    "SUPPORTED_ENDPOINTS",
    "BatchFileError",
    "BatchRequestSpec",
    "ParsedInput",
    "parse_batch_input",
    "validate_batch_endpoint",
]

SUPPORTED_ENDPOINTS = tuple(w.endpoint for w in WORKLOADS.values())
MAX_REPORTED_ERRORS = 100

_INVALID_JSON = "This line is not parseable as valid JSON."
_NOT_UTF8 = "This line is not valid UTF-8, so it is not parseable as valid JSON."
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class BatchFileError:
    """One entry of a failed batch's ``errors.data`` (OpenAI ``BatchError``)."""

    code: str
    message: str
    line: int | None = None
    """1-based line of the input file, or None for a problem with the file as a whole."""
    param: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchRequestSpec:
    """One well-formed line of the input file; exactly one of ``planned`` and ``error`` is set."""

    line: int
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]
    planned: Planned | None = None
    """The request as its workload planned it (model, payload, options, cost)."""
    error: IdlefleetError | None = None
    """Request-level failure: goes to the error file as ``error.http_status`` + ``to_openai()``."""


@dataclass(frozen=True, slots=True)
class ParsedInput:
    """The verdict on an input file: runnable requests, or the errors that fail the batch."""

    requests: list[BatchRequestSpec]
    errors: list[BatchFileError]

    @property
    def failed(self) -> bool:
        return bool(self.errors)


class _LineError(Exception):
    def __init__(self, error: BatchFileError) -> None:
        super().__init__(error.message)
        self.error = error


def validate_batch_endpoint(endpoint: object) -> str:
    """Check a batch's ``endpoint`` at create time; raise 400 ``invalid_value`` if unsupported."""
    if isinstance(endpoint, str) and endpoint in SUPPORTED_ENDPOINTS:
        return endpoint
    supported = ", ".join(f"'{e}'" for e in SUPPORTED_ENDPOINTS)
    raise InvalidRequest(
        f"Invalid value: '{endpoint}'. Supported values are: {supported}.",
        code="invalid_value",
        param="endpoint",
    )


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; JSON does not, and OpenAI would not.
    raise ValueError(f"{name} is not JSON")


def _fail(line: int, code: str, message: str, param: str | None = None) -> NoReturn:
    raise _LineError(BatchFileError(code=code, message=message, line=line, param=param))


def _require(request: dict[str, Any], field: str, line: int, expected: type, kind: str) -> Any:
    if field not in request:
        _fail(line, "missing_required_parameter", f"Missing required parameter: '{field}'.", field)
    value = request[field]
    if not isinstance(value, expected):
        _fail(
            line,
            "invalid_type",
            f"Invalid type for '{field}': expected {kind}, but got {json_kind(value)} instead.",
            field,
        )
    return value


def _check_model(body: dict[str, Any], line: int, workload: Workload) -> None:
    if "model" not in body or body["model"] is None:
        _fail(line, "invalid_request", "Model parameter is required.", "body.model")
    name = body["model"]
    if not isinstance(name, str):
        message = f"Invalid type for 'body.model': expected a string, but got {json_kind(name)}"
        _fail(line, "invalid_type", f"{message} instead.", "body.model")
    if workload.canonical_model(name) is None:
        _fail(
            line,
            "model_not_found",
            f"The provided model '{name}' is not supported by the Batch API.",
            "body.model",
        )


def _parse_line(text: str, line: int, workload: Workload, seen: dict[str, int]) -> BatchRequestSpec:
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        _fail(line, "invalid_json_line", _INVALID_JSON)
    if not isinstance(request, dict):
        _fail(line, "invalid_request", "Each line must be a JSON object.")
    suspicious = may_hold_surrogates(text)  # only then is the parsed line walked at all
    if suspicious:
        outside = unpaired_surrogate({k: v for k, v in request.items() if k != "body"})
        if outside is not None:  # no custom_id to report a request-level error under
            _fail(line, "invalid_value", surrogate_message(outside), outside)
    custom_id = _require(request, "custom_id", line, str, "a string")
    if "\x00" in custom_id:  # kept as text, which no store's may hold (PostgreSQL refuses)
        _fail(
            line,
            "invalid_value",
            "Invalid value for 'custom_id': it must not contain NUL characters.",
            "custom_id",
        )
    if custom_id in seen:
        _fail(
            line,
            "duplicate_custom_id",
            f"The custom_id '{custom_id}' is already used on line {seen[custom_id]}; each "
            "custom_id must be unique within a batch.",
            "custom_id",
        )
    seen[custom_id] = line
    method = _require(request, "method", line, str, "a string")
    if method != "POST":
        _fail(line, "invalid_value", f"Invalid value: '{method}'. Supported values are: 'POST'.")
    url = _require(request, "url", line, str, "a string")
    if url != workload.endpoint:
        _fail(
            line,
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            "url",
        )
    body = _require(request, "body", line, dict, "an object")
    bad_text = unpaired_surrogate(body, "body") if suspicious else None
    if bad_text == "body.model":
        _fail(line, "invalid_value", surrogate_message(bad_text), bad_text)
    _check_model(body, line, workload)
    if bad_text is not None:  # inside the body: this request fails, the batch goes on
        error = InvalidRequest(
            surrogate_message(bad_text.removeprefix("body.")),
            code="invalid_value",
            param=bad_text.removeprefix("body."),
        )
        return BatchRequestSpec(line, custom_id, method, url, body, error=error)
    try:
        planned = workload.plan(body)
    except IdlefleetError as error:
        return BatchRequestSpec(line, custom_id, method, url, body, error=error)
    return BatchRequestSpec(line, custom_id, method, url, body, planned=planned)


def _decode_lines(data: bytes) -> list[str | None]:
    """The file's lines as text; None for a line that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Rare path: decode line by line so the error can name the broken line.
        lines: list[str | None] = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(None)
    else:
        lines = list(text.split("\n"))
    if lines and lines[0] is not None and lines[0].startswith(_BOM):
        lines[0] = lines[0][len(_BOM) :]
    return lines


def parse_batch_input(
    data: bytes,
    endpoint: str,
    *,
    max_requests: int = 50_000,
    max_inputs: int | None = None,
) -> ParsedInput:
    """Validate a batch input file for ``endpoint``; see the module docstring for the rules.

    Raises ``InvalidRequest`` if ``endpoint`` itself is unsupported (a create-time mistake, which
    the API should have caught with ``validate_batch_endpoint``).
    """
    workload = by_endpoint(validate_batch_endpoint(endpoint))
    assert workload is not None  # validate_batch_endpoint raised otherwise
    if max_inputs is None:
        max_inputs = workload.max_batch_inputs
    lines = _decode_lines(data)
    # Blank lines are neither requests nor errors; line numbers still count them.
    numbered = [(n, text) for n, text in enumerate(lines, start=1) if text is None or text.strip()]
    if not numbered:
        return ParsedInput([], [BatchFileError("empty_file", "The batch input file is empty.")])
    if len(numbered) > max_requests:
        message = (
            f"The batch input file contains {len(numbered)} requests, but a batch can contain "
            f"at most {max_requests}."
        )
        return ParsedInput([], [BatchFileError("too_many_tasks", message)])

    requests: list[BatchRequestSpec] = []
    errors: list[BatchFileError] = []
    seen: dict[str, int] = {}
    for line, text in numbered:
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        if text is None:
            errors.append(BatchFileError("invalid_json_line", _NOT_UTF8, line))
            continue
        try:
            requests.append(_parse_line(text, line, workload, seen))
        except _LineError as failure:
            errors.append(failure.error)
    if errors:
        return ParsedInput([], errors)

    total_inputs = sum(r.planned.cost.inputs for r in requests if r.planned is not None)
    if max_inputs is not None and total_inputs > max_inputs:
        message = (
            f"The batch contains {total_inputs} inputs across its requests, but a batch for "
            f"{endpoint} can contain at most {max_inputs}."
        )
        return ParsedInput([], [BatchFileError("too_many_tasks", message)])
    return ParsedInput(requests, [])
