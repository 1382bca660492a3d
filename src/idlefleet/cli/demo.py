"""The demo batch: real sentences through the official ``openai`` SDK, with a progress bar."""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from openai import DefaultHttpxClient, OpenAI
from tqdm import tqdm

from idlefleet.embedded.tls import client_context
from idlefleet.models.catalog import MINILM, SMOLLM2

_SUBJECTS = [
    "The parked car",
    "A delivery van",
    "My neighbour's EV",
    "The night shift",
    "A taxi fleet",
    "The charging station",
    "An old sedan",
    "The city bus depot",
    "A rooftop garage",
    "The owner",
]
_VERBS = [
    "computes",
    "waits for",
    "earns money from",
    "stops",
    "resumes",
    "measures",
    "schedules",
    "forgets",
    "downloads",
    "verifies",
]
_OBJECTS = [
    "sentence embeddings overnight",
    "a batch of customer reviews",
    "the battery floor",
    "its share of the grid",
    "a lease from the coordinator",
    "thermal limits in summer",
    "weather reports for Lisbon",
    "invoices in three languages",
    "a model signed by sha256",
    "the next unit of work",
]
_TAILS = [
    "",
    " before the driver returns",
    " while it is plugged in",
    " at 2 a.m.",
    " without draining the battery",
    " — and nobody notices",
    " (again)",
]


def demo_texts(n: int, seed: int = 7) -> list[str]:
    """``n`` varied, deterministic sentences."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        for _ in range(n)
    ]


def batch_input(texts: list[str], encoding_format: str = "float") -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MINILM.id, "input": text, "encoding_format": encoding_format},
            }
        )
        for i, text in enumerate(texts)
    ]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class DemoSummary:
    batch_id: str
    status: str
    requests: int
    completed: int
    failed: int
    seconds: float
    vehicles: dict[str, int]
    chat: ChatDemo | None = None

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


@dataclass
class ChatDemo:
    """One streamed chat completion: what came back, in how many chunks and how long."""

    question: str
    answer: str
    chunks: int
    completion_tokens: int
    seconds: float


CHAT_QUESTION = "In one sentence: why could a parked electric car run AI models?"


def run_chat_demo(client: OpenAI) -> ChatDemo:
    """Stream one chat completion from the fleet (greedy, so the demo's answer is the same
    every time)."""
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=SMOLLM2.id,
        messages=[{"role": "user", "content": CHAT_QUESTION}],
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, chunks, tokens = [], 0, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    answer = "".join(pieces).strip()
    if not answer or not tokens:
        raise RuntimeError("the demo's chat completion came back empty")
    return ChatDemo(CHAT_QUESTION, answer, chunks, tokens, time.monotonic() - started)


def run_demo(
    base_url: str,
    n: int,
    usage_lookup: Callable[[str], dict[str, int]],
    api_key: str,
    show_progress: bool = True,
    chat: bool = False,
    ca: Path | None = None,
) -> DemoSummary:
    """The demo batch of ``n`` embeddings; with ``chat``, then one streamed chat completion;
    as the customer whose key is ``api_key`` (over HTTPS checked against ``ca``, if given)."""
    http: dict[str, Any] = (
        {} if ca is None else {"http_client": DefaultHttpxClient(verify=client_context(ca))}
    )
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, **http)
    texts = demo_texts(n)
    uploaded = client.files.create(
        file=("demo.jsonl", io.BytesIO(batch_input(texts)), "application/jsonl"), purpose="batch"
    )
    started = time.monotonic()
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"source": "idlefleet up --demo"},
    )
    with tqdm(total=n, unit="req", desc="embedding", disable=not show_progress) as bar:
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
            done = counts.completed + counts.failed if counts else 0
            bar.update(done - bar.n)
    seconds = time.monotonic() - started
    if batch.status != "completed" or batch.output_file_id is None or not batch.request_counts:
        raise RuntimeError(f"demo batch ended {batch.status}: {batch.errors}")
    lines = client.files.content(batch.output_file_id).text.splitlines()
    first = json.loads(lines[0])["response"]["body"]["data"][0]["embedding"]
    vector = np.asarray(first, dtype=np.float32)
    if vector.shape != (MINILM.dim,) or abs(float(np.linalg.norm(vector)) - 1) > 1e-3:
        raise RuntimeError("demo output does not hold unit-length 384-d embeddings")
    online = client.embeddings.create(model=MINILM.id, input=[texts[0]])
    if float(np.dot(np.asarray(online.data[0].embedding, dtype=np.float32), vector)) < 0.9999:
        raise RuntimeError("online and batch embeddings of the same text disagree")
    return DemoSummary(
        batch_id=batch.id,
        status=batch.status,
        requests=n,
        completed=batch.request_counts.completed,
        failed=batch.request_counts.failed,
        seconds=seconds,
        vehicles=usage_lookup(batch.id),
        chat=run_chat_demo(client) if chat else None,
    )
