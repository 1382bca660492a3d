"""``idlefleet up`` in the scaled-out shape: PostgreSQL, two replicas, a 3-node NATS cluster.

The command a reader of docs/DEPLOY.md tries first, run as a user would (a subprocess), with the
demo batch going through it end to end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg.conninfo import conninfo_to_dict


@pytest.mark.integration
def test_up_runs_the_demo_on_postgresql_with_two_replicas_and_a_nats_cluster(
    tmp_path: Path, postgres_database: str
) -> None:
    parts = conninfo_to_dict(postgres_database)
    store = urlunsplit(
        urlsplit(f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/")._replace(
            path=f"/{parts['dbname']}"
        )
    )

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlefleet",
            "up",
            "--store",
            store,
            "--replicas",
            "2",
            "--nats-cluster",
            "3",
            "--demo",
            "--demo-requests",
            "200",
            "--data-dir",
            str(tmp_path / "fleet"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert out.count("idlefleet: OpenAI API") == 2
    assert out.count("nats://") >= 3
    assert "completed" in out and "200 (200 completed, 0 failed)" in out
    # It ends with what the batch cost the customer and earned each owner, from the ledger.
    cost = re.search(r"cost +(\d+\.\d{6}) USD to the customer \((\d+) tokens\)", out)
    assert cost is not None and float(cost[1]) > 0 and int(cost[2]) > 0, out[-3000:]
    earned = re.findall(r"earnings +([\w-]+): (\d+\.\d{6}) USD \((\d+\.\d{6}) in escrow", out)
    assert earned and all(float(total) > 0 for _, total, _ in earned), out[-3000:]
    assert sum(float(total) for _, total, _ in earned) < float(cost[1])  # the platform's fee
    # The agents serve every model by default: the demo ends with a streamed chat answer.
    assert "tokens from a car in" in out and "server-sent events" in out
