"""The spine through the real stack with the official openai SDK: upload, batch, poll, download."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from openai import OpenAI

from idlefleet.embedded.fleet import EmbeddedFleet
from tests.integration.conftest import read_jsonl, request_line, submit, wait_for


def _decode(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def test_batch_embeddings_match_sentence_transformers(
    client: OpenAI, fleet: EmbeddedFleet, reference: dict[str, Any]
) -> None:
    # Arrange: every reference input as one request; half float, half base64 (the SDK default).
    inputs = reference["inputs"]
    lines = [
        request_line(
            f"ref-{i}",
            {
                "model": "all-MiniLM-L6-v2",
                "input": text,
                "encoding_format": "base64" if i % 2 else "float",
            },
        )
        for i, text in enumerate(inputs)
    ]
    # Act
    batch = wait_for(client, submit(client, ("\n".join(lines) + "\n").encode()).id)
    # Assert
    # The empty string is in the reference set, but OpenAI refuses it as input: error file.
    refused = {f"ref-{i}" for i, text in enumerate(inputs) if text == ""}
    assert refused
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None
    assert batch.request_counts.total == len(inputs)
    assert batch.request_counts.completed == len(inputs) - len(refused)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert {r["custom_id"] for r in read_jsonl(client, batch.error_file_id)} == refused
    rows = read_jsonl(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(
        f"ref-{i}" for i in range(len(inputs)) if f"ref-{i}" not in refused
    )
    expected = np.asarray(reference["embeddings"], dtype=np.float32)
    cosines = []
    for row in rows:
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2"
        assert body["usage"]["prompt_tokens"] > 0
        i = int(row["custom_id"].removeprefix("ref-"))
        got = _decode(body["data"][0]["embedding"])
        want = expected[i]
        cosines.append(float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
    assert min(cosines) >= 0.99999, f"worst cosine {min(cosines)}"
    assert len(cosines) == len(inputs) - len(refused)
    usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
    assert sum(usage.values()) == len(inputs) - len(refused)


def test_online_embeddings_with_sdk_defaults(client: OpenAI, reference: dict[str, Any]) -> None:
    # The SDK asks for base64 and decodes little-endian float32 itself.
    picked = [i for i, text in enumerate(reference["inputs"]) if text][:12]
    texts = [reference["inputs"][i] for i in picked]
    response = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    assert [d.index for d in response.data] == list(range(len(texts)))
    got = np.asarray([d.embedding for d in response.data], dtype=np.float32)
    want = np.asarray([reference["embeddings"][i] for i in picked], dtype=np.float32)
    cosines = (got * want).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    )
    assert cosines.min() >= 0.99999
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_batches_list_pages_and_models(client: OpenAI) -> None:
    for _ in range(3):
        submit(
            client,
            (request_line("x", {"model": "all-MiniLM-L6-v2", "input": "hi"}) + "\n").encode(),
        )
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows has_more/after
    assert len(seen) == len(set(seen)) >= 3
    assert [m.id for m in client.models.list()] == ["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"]
