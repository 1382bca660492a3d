"""Tests for openai_format: responses and JSONL lines the real OpenAI SDK reads back exactly."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse

from idlefleet.coordinator.errors import InvalidRequest
from idlefleet.coordinator.openai_format import (
    BATCH_REQUEST_ID_PREFIX,
    cancelled_line,
    error_line,
    expired_line,
    new_id,
    new_request_id,
    output_line,
    request_error_line,
)
from idlefleet.workloads.embeddings.render import embedding_response
from idlefleet.workloads.embeddings.request import MODEL_ID
from tests.workloads.embeddings.test_render import unit_vectors


def parse_line(line: bytes) -> dict[str, Any]:
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_output_line_has_openais_shape_and_a_parseable_body() -> None:
    vectors = unit_vectors(2)
    body = embedding_response(MODEL_ID, vectors, 5, "float")

    line = output_line(
        "batch_req_abc", "request-1", 200, body, response_request_id="0538a1cc8f8f8500"
    )

    parsed = parse_line(line)
    assert list(parsed) == ["id", "custom_id", "response", "error"]
    assert parsed["id"] == "batch_req_abc" and parsed["custom_id"] == "request-1"
    assert parsed["error"] is None
    assert parsed["response"]["status_code"] == 200
    assert parsed["response"]["request_id"] == "0538a1cc8f8f8500"
    embeddings = CreateEmbeddingResponse.model_validate(parsed["response"]["body"])
    assert np.array_equal(np.array(embeddings.data[1].embedding, dtype=np.float32), vectors[1])


def test_output_line_is_utf8_and_generates_a_request_id() -> None:
    line = output_line("batch_req_x", "naïve-✓", 200, {"ok": True})

    parsed = parse_line(line)
    assert "naïve-✓".encode() in line
    assert parsed["custom_id"] == "naïve-✓"
    assert re.fullmatch(r"[0-9a-f]{32}", parsed["response"]["request_id"])


def test_request_error_line_carries_status_and_openai_error_body() -> None:
    error = InvalidRequest("Invalid value: 'hex'.", code="invalid_value", param="encoding_format")

    parsed = parse_line(request_error_line("batch_req_1", "r-9", error))

    assert parsed["error"] is None
    assert parsed["response"]["status_code"] == 400
    assert parsed["response"]["body"] == {
        "error": {
            "message": "Invalid value: 'hex'.",
            "type": "invalid_request_error",
            "param": "encoding_format",
            "code": "invalid_value",
        }
    }


def test_expired_line_matches_openais_documented_line() -> None:
    parsed = parse_line(expired_line("batch_req_123", "request-3"))

    assert parsed == {
        "id": "batch_req_123",
        "custom_id": "request-3",
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }


def test_cancelled_and_custom_error_lines() -> None:
    cancelled = parse_line(cancelled_line("batch_req_1", "a"))
    custom = parse_line(error_line("batch_req_2", "b", "request_timeout", "Took too long."))

    assert cancelled["response"] is None and cancelled["error"]["code"] == "batch_cancelled"
    assert custom["error"] == {"code": "request_timeout", "message": "Took too long."}


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["file-", "batch_", BATCH_REQUEST_ID_PREFIX])
def test_new_id_is_prefixed_url_safe_and_unique(prefix: str) -> None:
    ids = {new_id(prefix) for _ in range(1000)}

    assert len(ids) == 1000
    for value in ids:
        assert re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9]{24}", value)


def test_new_request_id_is_32_hex_digits() -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id())
    assert new_request_id() != new_request_id()
