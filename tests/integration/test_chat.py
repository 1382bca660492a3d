"""Chat completions on the real stack (nats-server, a coordinator, two agents running
SmolLM2-135M-Instruct), through the official ``openai`` SDK: a batch, online plain and streamed
requests, a car preempted mid-generation (the owner opts out) and a car killed with SIGKILL
mid-stream. Every completion must equal the uninterrupted run of the same requests on the car's
own runner in this process (greedy, or a fixed seed): the tokens a car generated before it left
are kept and another car continues from them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.workloads.chat import CHAT
from idlefleet.workloads.chat.runner import ChatRunner
from tests.integration.conftest import read_jsonl, wait_for
from tests.workloads.embeddings.test_runner import allowed_gate

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
LONG = "Write a very long story about a robot who learns to paint."
"""Greedy SmolLM2 writes at least 400 tokens for this (no early end of text)."""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFleet]:
    options = FleetOptions(
        data_dir=tmp_path_factory.mktemp("chat"),
        agents=2,
        lease_seconds=6.0,
        heartbeat_seconds=1.0,
        models=(MODEL,),
    )
    with EmbeddedFleet(options) as running:
        yield running


@pytest.fixture(scope="module")
def client(fleet: EmbeddedFleet) -> OpenAI:
    return OpenAI(
        base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def local(smollm2: Any, llama_session: Any) -> ChatRunner:
    """The car's runner, in this process: the uninterrupted reference."""
    return ChatRunner(
        MODEL, llama_session, smollm2.config, smollm2.tokenizer(), frozenset({smollm2.eos_id}), 8
    )


def uninterrupted(local: ChatRunner, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each request's result as the car encodes it, from one uninterrupted local run."""
    payloads = [CHAT.plan(body).payload for body in bodies]
    outcome = local.run(allowed_gate(), payloads, "reference")
    assert outcome.complete
    return [json.loads(r.data) for r in outcome.results if r is not None]


def submit_chat(client: OpenAI, bodies: list[dict[str, Any]], prefix: str) -> Batch:
    """A chat batch of ``bodies``, their custom ids ``prefix`` + index."""
    content = "\n".join(
        json.dumps(
            {
                "custom_id": f"{prefix}{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
        for i, body in enumerate(bodies)
    )
    uploaded = client.files.create(file=("chat.jsonl", content.encode()), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def status(fleet: EmbeddedFleet, vehicle_id: str) -> str | None:
    listing = fleet.get("/fleet/vehicles") or {"data": []}
    found = [v for v in listing["data"] if v["id"] == vehicle_id and v["online"]]
    return found[0]["status"] if found else None


def wait_status(fleet: EmbeddedFleet, vehicle_id: str, paused: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = status(fleet, vehicle_id)
        if now is not None and (now == "paused") == paused:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{vehicle_id} not {'paused' if paused else 'serving'} after {timeout} s")


def only(fleet: EmbeddedFleet, vehicle_id: str) -> None:
    """Let only ``vehicle_id`` take work: every other car is opted out."""
    for other in fleet.agents:
        if other != vehicle_id:
            fleet.set_consent(other, False)
            wait_status(fleet, other, paused=True)
    fleet.set_consent(vehicle_id, True)
    wait_status(fleet, vehicle_id, paused=False)


def hand_over(fleet: EmbeddedFleet, leaving: str, taking: str) -> None:
    """``taking`` may work again, then ``leaving``'s owner opts it out (a preemption)."""
    fleet.set_consent(taking, True)
    wait_status(fleet, taking, paused=False)
    fleet.set_consent(leaving, False)


def test_models_lists_the_chat_model(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids and "all-MiniLM-L6-v2" in ids


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            400,
            "messages[0].content[0].type",
        ),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 9000}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ({"temperature": 2.5}, 400, "temperature"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"n": 2}, 400, "n"),
        # OpenAI's model_not_found names no param.
        ({"model": "all-MiniLM-L6-v2"}, 404, None),
        ({"model": "no-such-model"}, 404, None),
    ],
)
def test_bad_chat_requests_get_openais_errors(
    client: OpenAI, fields: dict[str, Any], status: int, param: str | None
) -> None:
    body = {**chat("Hi"), **fields}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param, caught.value.body


def test_chat_bodies_that_are_not_unicode_are_400(fleet: EmbeddedFleet) -> None:
    for body in (
        b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b"\xff\xfe",
    ):
        request = urllib.request.Request(
            f"{fleet.base_url}/v1/chat/completions",
            data=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {fleet.api_key}",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 400
        assert json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"


def test_a_chat_batch_through_the_sdk(
    fleet: EmbeddedFleet, client: OpenAI, local: ChatRunner
) -> None:
    only(fleet, "car-001")
    fleet.set_consent("car-002", True)
    bodies = [
        chat(f"Tell me one fact about the number {i}.", max_tokens=24 + i, temperature=0)
        for i in range(10)
    ]
    bodies.append(chat("Name three colours.", max_tokens=40, temperature=0.9, seed=11))
    bodies.append(chat("Say hello.", max_tokens=40, temperature=0, stop=["!", "."]))
    batch = submit_chat(client, bodies, "c")
    done = wait_for(client, batch.id, timeout=240)

    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == len(bodies)
    lines = {line["custom_id"]: line for line in read_jsonl(client, done.output_file_id or "")}
    expected = uninterrupted(local, bodies)
    for i, want in enumerate(expected):
        body = lines[f"c{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"] == want["text"], i
        assert body["choices"][0]["finish_reason"] == want["finish_reason"], i
        assert body["usage"]["completion_tokens"] == len(want["tokens"]), i
    assert "!" not in lines["c11"]["response"]["body"]["choices"][0]["message"]["content"]


def test_online_plain_and_streamed_completions_match(
    fleet: EmbeddedFleet, client: OpenAI, local: ChatRunner
) -> None:
    body = chat("What is the capital of France?", max_tokens=48, temperature=0)
    (want,) = uninterrupted(local, [body])

    plain = client.chat.completions.create(**body)
    streamed = list(
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )

    assert plain.choices[0].message.content == want["text"]
    assert plain.usage is not None and plain.usage.completion_tokens == len(want["tokens"])
    assert streamed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == want["text"]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == want["finish_reason"]
    assert streamed[-1].choices == [] and streamed[-1].usage is not None
    assert streamed[-1].usage.completion_tokens == len(want["tokens"])
    assert all(c.usage is None for c in streamed[:-1])
    assert len({c.id for c in streamed}) == 1


def test_a_stream_continues_on_another_car_when_its_car_is_preempted(
    fleet: EmbeddedFleet, client: OpenAI, local: ChatRunner
) -> None:
    body = chat(LONG, max_tokens=400, temperature=0)
    (want,) = uninterrupted(local, [body])
    only(fleet, "car-001")
    moved_before = fleet.get("/fleet/dispatch").get("online_moved", {})

    chunks = []
    pieces = []
    for chunk in client.chat.completions.create(**body, stream=True):
        chunks.append(chunk)
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if len(chunks) == 40:  # mid-sentence: the owner of car-001 wants it back
            hand_over(fleet, "car-001", "car-002")

    assert "".join(pieces) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    moved = fleet.get("/fleet/dispatch")["online_moved"]
    assert moved.get("stopped", 0) == moved_before.get("stopped", 0) + 1, moved


def test_a_batch_continues_on_another_car_when_its_car_is_preempted(
    fleet: EmbeddedFleet, client: OpenAI, local: ChatRunner
) -> None:
    bodies = [chat(LONG, max_tokens=300, temperature=0)] + [
        chat(f"{LONG} Call the robot R{i}.", max_tokens=300, temperature=0.8, seed=i)
        for i in range(5)
    ]
    expected = uninterrupted(local, bodies)
    only(fleet, "car-002")
    before = fleet.get("/fleet/dispatch")
    batch = submit_chat(client, bodies, "p")
    # car-002 reports its progress every 2 s (a third of the lease): wait for some, then its
    # owner takes it back.
    deadline = time.monotonic() + 120
    while fleet.get("/fleet/dispatch")["progress_recorded"] <= before["progress_recorded"]:
        assert time.monotonic() < deadline, "car-002 reported no progress"
        time.sleep(0.2)
    hand_over(fleet, "car-002", "car-001")
    done = wait_for(client, batch.id, timeout=240)

    assert done.status == "completed", done
    lines = {line["custom_id"]: line for line in read_jsonl(client, done.output_file_id or "")}
    for i, want in enumerate(expected):
        got = lines[f"p{i}"]["response"]["body"]["choices"][0]["message"]["content"]
        assert got == want["text"], i
    after = fleet.get("/fleet/dispatch")
    assert after["resumed_with_progress"] > before["resumed_with_progress"], after
    usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
    assert usage.get("car-001", 0) > 0, usage


def test_a_stream_survives_its_car_killed_with_sigkill(
    fleet: EmbeddedFleet, client: OpenAI, local: ChatRunner
) -> None:
    body = chat(LONG, max_tokens=300, temperature=0.7, seed=5)
    (want,) = uninterrupted(local, [body])
    only(fleet, "car-001")
    before = fleet.get("/fleet/dispatch").get("online_moved", {})

    pieces = []
    gaps = []
    last = time.monotonic()
    for n, chunk in enumerate(client.chat.completions.create(**body, stream=True)):
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if n == 30:  # mid-sentence, car-001 dies (car-002 may work again first)
            fleet.set_consent("car-002", True)
            wait_status(fleet, "car-002", paused=False)
            fleet.kill_agent("car-001")

    assert "".join(pieces) == want["text"]
    moved = fleet.get("/fleet/dispatch")["online_moved"]
    assert moved.get("silent", 0) + moved.get("gone", 0) == (
        before.get("silent", 0) + before.get("gone", 0) + 1
    ), moved
    assert max(gaps) < 30  # the client saw a pause, not an end
