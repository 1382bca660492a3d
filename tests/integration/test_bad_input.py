"""Bad input through the real stack gets OpenAI's errors, never a 500, and loses nothing else."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from openai import OpenAI

from idlefleet.embedded.fleet import EmbeddedFleet
from tests.integration.conftest import (
    MAX_FILE_BYTES,
    read_jsonl,
    request_line,
    submit,
    wait_for,
)

MODEL = "all-MiniLM-L6-v2"


def _good(custom_id: str, text: str = "a parked car") -> str:
    return request_line(custom_id, {"model": MODEL, "input": text})


def _file(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _failed_with(client: OpenAI, content: bytes) -> list[dict[str, Any]]:
    batch = wait_for(client, submit(client, content).id)
    assert batch.status == "failed"
    assert batch.failed_at is not None and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data
    return [e.model_dump() for e in batch.errors.data]


@pytest.mark.parametrize(
    ("content", "code", "line"),
    [
        (_file(_good("a"), "{not json"), "invalid_json_line", 2),
        (_file(_good("a"), _good("a")), "duplicate_custom_id", 2),
        (
            _file(request_line("a", {"model": MODEL, "input": "x"}, method="GET")),
            "invalid_value",
            1,
        ),
        (
            _file(_good("a"), request_line("b", {"model": MODEL, "input": "x"}, url="/v1/chat")),
            "invalid_url",
            2,
        ),
        (_file(request_line("a", {"model": "gpt-imaginary", "input": "x"})), "model_not_found", 1),
        (_file(_good("a")).replace(b"parked", b"p\xffrked"), "invalid_json_line", 1),
        (b"", "empty_file", None),
    ],
    ids=[
        "malformed-json",
        "duplicate-id",
        "wrong-method",
        "wrong-url",
        "unknown-model",
        "non-utf8",
        "empty",
    ],
)
def test_file_level_problems_fail_the_batch(
    client: OpenAI, content: bytes, code: str, line: int | None
) -> None:
    errors = _failed_with(client, content)
    assert errors[0]["code"] == code
    assert errors[0]["line"] == line
    assert errors[0]["message"]


def test_more_than_50000_requests_fail_the_batch(client: OpenAI) -> None:
    lines = [request_line(f"r{i}", {"model": MODEL, "input": "x"}) for i in range(50_001)]
    content = _file(*lines)
    assert len(content) < MAX_FILE_BYTES
    errors = _failed_with(client, content)
    assert errors[0]["code"] == "too_many_tasks"


def test_request_level_problems_go_to_the_error_file(client: OpenAI) -> None:
    content = _file(
        _good("ok-1", "first good request"),
        request_line("no-input", {"model": MODEL}),
        request_line("empty-input", {"model": MODEL, "input": ""}),
        request_line("empty-list", {"model": MODEL, "input": []}),
        request_line("tokens", {"model": MODEL, "input": [101, 2023, 102]}),
        request_line("bad-format", {"model": MODEL, "input": "x", "encoding_format": "hex"}),
        _good("ok-2", "second good request"),
    )
    batch = wait_for(client, submit(client, content).id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed) == (7, 2)
    assert batch.request_counts.failed == 5
    ok = read_jsonl(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in ok) == ["ok-1", "ok-2"]
    errors = {r["custom_id"]: r for r in read_jsonl(client, batch.error_file_id)}
    assert set(errors) == {"no-input", "empty-input", "empty-list", "tokens", "bad-format"}
    for row in errors.values():
        assert row["response"]["status_code"] == 400
        assert row["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert row["response"]["body"]["error"]["message"]


def test_text_that_is_json_but_not_unicode_fails_its_request_not_the_batch(
    client: OpenAI,
) -> None:
    # json.dumps writes the lone surrogate as the escape \ud800: valid JSON, not Unicode.
    content = _file(
        _good("ok-1", "first good request"),
        request_line("lone", {"model": MODEL, "input": ["fine", "broken \ud800 text"]}),
        request_line("pair", {"model": MODEL, "input": "an emoji \U0001f600 escaped as a pair"}),
        request_line("in-user", {"model": MODEL, "input": "x", "user": "\udfff"}),
    )
    batch = wait_for(client, submit(client, content).id, timeout=60)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    ok = read_jsonl(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in ok) == ["ok-1", "pair"]
    errors = {r["custom_id"]: r["response"] for r in read_jsonl(client, batch.error_file_id)}
    assert set(errors) == {"lone", "in-user"}
    assert all(e["status_code"] == 400 for e in errors.values())
    assert errors["lone"]["body"]["error"]["param"] == "input[1]"
    assert errors["in-user"]["body"]["error"]["param"] == "user"
    assert "not valid Unicode" in errors["lone"]["body"]["error"]["message"]


def test_a_custom_id_that_is_not_unicode_fails_the_batch_with_its_line(client: OpenAI) -> None:
    errors = _failed_with(client, _file(_good("a"), _good("b\ud800")))
    assert (errors[0]["code"], errors[0]["line"], errors[0]["param"]) == (
        "invalid_value",
        2,
        "custom_id",
    )


def test_oversized_upload_is_refused_with_413(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(
            file=("big.jsonl", io.BytesIO(b"x" * (MAX_FILE_BYTES + 1))), purpose="batch"
        )
    assert caught.value.status_code == 413
    assert "too large" in caught.value.message


def test_wrong_purpose_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"


def test_unknown_ids_are_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError) as caught:
        client.batches.create(
            input_file_id="file-doesnotexist", endpoint="/v1/embeddings", completion_window="24h"
        )
    assert caught.value.body["param"] == "input_file_id"


def test_bad_batch_parameters_are_400(client: OpenAI) -> None:
    uploaded = client.files.create(file=("a.jsonl", io.BytesIO(_file(_good("a")))), purpose="batch")
    for endpoint, window in [("/v1/responses", "24h"), ("/v1/embeddings", "1h")]:
        with pytest.raises(openai.BadRequestError):
            client.batches.create(
                input_file_id=uploaded.id, endpoint=endpoint, completion_window=window
            )


def test_cancel_of_a_finished_batch_is_refused(client: OpenAI) -> None:
    batch = wait_for(client, submit(client, _file(_good("a"))).id)
    assert batch.status == "completed"
    with pytest.raises(openai.APIStatusError) as caught:
        client.batches.cancel(batch.id)
    assert caught.value.status_code == 409
    assert client.batches.retrieve(batch.id).status == "completed"


def test_cancel_in_progress_keeps_finished_results(client: OpenAI) -> None:
    lines = [_good(f"c{i}", f"sentence number {i} about parking") for i in range(4000)]
    batch = submit(client, _file(*lines))
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 100:
        assert time.monotonic() < deadline, "the batch never got going"
        time.sleep(0.02)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait_for(client, batch.id)
    assert final.status == "cancelled" and final.cancelled_at is not None
    counts = final.request_counts
    assert counts.completed + counts.failed == counts.total == 4000
    cancelled_rows = read_jsonl(client, final.error_file_id) if final.error_file_id else []
    assert all(r["error"]["code"] == "batch_cancelled" for r in cancelled_rows)
    done_rows = read_jsonl(client, final.output_file_id) if final.output_file_id else []
    assert len(done_rows) + len(cancelled_rows) == 4000
    assert 100 <= len(done_rows) < 4000


def test_online_embedding_errors(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hello")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", b"{not json"),
        ("/v1/embeddings", b"\xff\xfe"),
        ("/v1/embeddings", b"[1, 2]"),
        ("/v1/embeddings", b'{"model": "all-MiniLM-L6-v2", "input": ["ok", "\\ud800"]}'),
        ("/v1/batches", b"{not json"),
        ("/v1/batches", b'{"input_file_id": 3}'),
        (
            "/v1/batches",
            b'{"input_file_id": "file-1", "endpoint": "/v1/embeddings", '
            b'"completion_window": "24h", "metadata": {"k": "\\ud800"}}',
        ),
    ],
)
def test_garbage_bodies_are_400_not_500(fleet: EmbeddedFleet, path: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {fleet.api_key}"}
    request = urllib.request.Request(fleet.base_url + path, data=body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_the_fleet_still_works_after_bad_input(client: OpenAI) -> None:
    batch = wait_for(client, submit(client, _file(_good("after", "still alive"))).id)
    assert batch.status == "completed" and batch.request_counts.completed == 1
