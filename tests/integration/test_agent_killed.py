"""An agent SIGKILLed in the middle of a lease: the batch completes, every custom_id once."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

from openai import OpenAI

from idlefleet.cli.demo import batch_input, demo_texts
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from tests.integration.conftest import read_jsonl, wait_for


def test_sigkill_mid_lease_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # Arrange: short leases so the lost unit comes back quickly; small units so both cars work.
    n = 3000
    options = FleetOptions(
        data_dir=tmp_path, agents=2, lease_seconds=3.0, heartbeat_seconds=1.0, max_unit=64
    )
    with EmbeddedFleet(options) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        uploaded = client.files.create(
            file=("in.jsonl", io.BytesIO(batch_input(demo_texts(n)))), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        # Act: wait until the victim has committed work and holds a live lease, then kill it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
            leases = fleet.get("/fleet/leases")["data"]
            held = [lease for lease in leases if lease["vehicle_id"] == "car-001"]
            if usage.get("car-001", 0) >= 100 and held:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("car-001 never held a lease after committing work")
        fleet.kill_agent("car-001")
        killed_lease_ids = {lease["id"] for lease in held}
        done_at_kill = client.batches.retrieve(batch.id).request_counts.completed
        finished = wait_for(client, batch.id, timeout=240)

        # Assert
        assert done_at_kill < n, "the kill must happen while the batch still has work"
        assert finished.status == "completed"
        assert finished.request_counts.completed == n and finished.request_counts.failed == 0
        rows = read_jsonl(client, finished.output_file_id)
        counts = Counter(row["custom_id"] for row in rows)
        assert len(rows) == n and set(counts.values()) == {1}
        assert set(counts) == {f"req-{i}" for i in range(n)}
        usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles")["completed_by_vehicle"]
        assert usage["car-001"] + usage["car-002"] == n
        all_leases = {lease["id"]: lease for lease in fleet.get("/fleet/leases?all=1")["data"]}
        assert all(all_leases[lid]["state"] in ("expired", "finished") for lid in killed_lease_ids)
        assert any(all_leases[lid]["state"] == "expired" for lid in killed_lease_ids)
