"""Fixtures that run the real stack: nats-server, a coordinator process and agent processes."""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types import Batch

from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions

REFERENCE = Path(__file__).parents[1] / "data" / "minilm_reference.json"
MAX_FILE_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("fleet"),
        agents=2,
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        max_file_bytes=MAX_FILE_BYTES,
    )
    with EmbeddedFleet(options) as running:
        yield running


@pytest.fixture
def client(fleet: EmbeddedFleet) -> OpenAI:
    return OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


def request_line(custom_id: str, body: dict[str, Any], **overrides: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}
    line.update(overrides)
    return json.dumps(line)


def submit(client: OpenAI, content: bytes) -> Batch:
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )


def wait_for(client: OpenAI, batch_id: str, timeout: float = 180.0) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} not finished after {timeout} s")


def read_jsonl(client: OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


async def car_request(nc: Any, subject: str, data: bytes, timeout: float) -> Any:
    """``nc.request`` with the reply in the inbox of the car whose uplink ``subject`` is: a
    coordinator with car identities on answers a car only there, and these tests speak for
    many cars over one connection."""
    vehicle_id = subject.split(".")[3]
    inbox = f"_INBOX.{vehicle_id}.{uuid.uuid4().hex}"
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=inbox)
        return await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
