"""Units and result chunks bounded in bytes, through the real fleet (nats-server, coordinator,
an agent running MiniLM): a batch of 16 requests of ~1 MB each, which by count would go out as
units of 9 (a 9 MB grant, more than the 8 MiB NATS message), is leased in units of at most 2
MiB; a request with more inputs than a result chunk holds comes back in a chunk of its own;
every request is answered once with the right number of vectors."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import read_jsonl, request_line, submit, wait_for

MODEL = "all-MiniLM-L6-v2"
LONG = 16  # requests of ~1 MB each
MANY = 1100  # inputs of one request: more than a result chunk's 1,024 vectors


@pytest.mark.integration
def test_a_batch_larger_than_a_unit_in_bytes_is_split_and_completes(tmp_path: Path) -> None:
    lines = [
        request_line(f"long-{i}", {"model": MODEL, "input": f"{i} " + "parked car " * 95_000})
        for i in range(LONG)
    ]
    lines.append(
        request_line("many", {"model": MODEL, "input": [f"short text {k}" for k in range(MANY)]})
    )
    content = ("\n".join(lines) + "\n").encode()
    assert len(content) > 7 * UnitPolicy().max_bytes

    with EmbeddedFleet(FleetOptions(data_dir=tmp_path, agents=1)) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        batch = wait_for(client, submit(client, content).id, timeout=240)
        assert batch.status == "completed", batch
        assert batch.output_file_id is not None
        rows = {r["custom_id"]: r for r in read_jsonl(client, batch.output_file_id)}
        leases = [
            lease
            for lease in fleet.get("/fleet/leases?all=true")["data"]
            if lease["batch_id"] == batch.id
        ]

    assert batch.request_counts.completed == LONG + 1 and batch.request_counts.failed == 0
    assert sorted(rows) == sorted([f"long-{i}" for i in range(LONG)] + ["many"])
    assert len(rows["many"]["response"]["body"]["data"]) == MANY
    assert all(len(rows[f"long-{i}"]["response"]["body"]["data"]) == 1 for i in range(LONG))
    # Two of the long requests fit a unit's 2 MiB: eight units or more held them.
    assert len(leases) >= LONG // 2
