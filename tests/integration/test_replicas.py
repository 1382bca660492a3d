"""The scaled-out shape under faults: exactly once, one set of output files.

Two coordinator replicas in one queue group on PostgreSQL, a 3-node nats-server cluster, two
agents running MiniLM. Two batches run (one submitted to each replica); mid-way, in turn, one
replica is SIGKILLed, one NATS node is SIGKILLed, and PostgreSQL (a private server this test
started) is stopped for 3 s and started again. Every batch must complete with every
``custom_id`` exactly once, and the store must hold exactly one output file per batch (no
second set from a finalisation that a dying replica started).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from openai import OpenAI

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.coordinator.store import open_store
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.embedded.postgres import PrivatePostgres, create_database
from tests.integration.conftest import read_jsonl, submit, wait_for

N = 2_000  # per batch


def _client(fleet: EmbeddedFleet, replica: int) -> OpenAI:
    return OpenAI(base_url=f"{fleet.replica_url(replica)}/v1", api_key=fleet.api_key, max_retries=3)


def _until(what: str, ready: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.mark.integration
def test_replicas_keep_every_batch_exactly_once_through_three_faults(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    create_database(private_postgres.dsn(), "idlefleet_faults")
    store_url = private_postgres.dsn("idlefleet_faults")
    options = FleetOptions(
        data_dir=tmp_path,
        agents=2,
        replicas=2,
        nats_nodes=3,
        store_url=store_url,
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        max_unit=64,
        claim_seconds=5.0,
    )
    with EmbeddedFleet(options) as fleet:
        survivor = _client(fleet, 1)
        first = submit(survivor, batch_input(demo_texts(N, seed=1))).id
        second = submit(_client(fleet, 0), batch_input(demo_texts(N, seed=2))).id

        def completed() -> int:
            return sum(
                (survivor.batches.retrieve(b).request_counts.completed or 0)  # type: ignore[union-attr]
                for b in (first, second)
            )

        faults: list[tuple[str, int]] = []
        _until("a fifth of the work", lambda: completed() >= 2 * N // 5)
        fleet.kill_coordinator(0)
        faults.append(("replica 0 killed", completed()))
        _until("half of the work", lambda: completed() >= N)
        fleet.kill_nats_node(0)
        faults.append(("NATS node 0 killed", completed()))
        _until("two thirds of the work", lambda: completed() >= 4 * N // 3)
        done_before_outage = completed()
        private_postgres.stop()
        time.sleep(3.0)  # long enough for every car to be refused and to retry
        private_postgres.start()
        faults.append(("PostgreSQL down for 3 s", done_before_outage))

        finished = [wait_for(survivor, b, timeout=300) for b in (first, second)]
        outputs = [read_jsonl(survivor, b.output_file_id or "") for b in finished]

    assert [done for _, done in faults] == sorted(done for _, done in faults)
    assert all(done < 2 * N for _, done in faults), f"a fault came after the work: {faults}"
    for batch, rows, seed_ids in zip(finished, outputs, ("first", "second"), strict=True):
        assert batch.status == "completed", (seed_ids, batch)
        counts = Counter(row["custom_id"] for row in rows)
        assert set(counts) == {f"req-{i}" for i in range(N)}
        assert set(counts.values()) == {1}
        assert batch.error_file_id is None
    store = open_store(store_url)
    try:
        for batch in finished:
            files = [f.id for f in store.batch_files(batch.id)]
            assert files == [batch.output_file_id], f"{batch.id} has files {files}"
    finally:
        store.close()
