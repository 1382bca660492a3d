"""A loop of a real agent that dies stops the agent visibly: it releases its lease and
``run`` raises (the CLI exits 1), instead of a live process that heartbeats and does nothing.

The agent runs in this process (so a fault can be put into it) against a real nats-server and
coordinator process, with MiniLM; it takes a unit, then its code for planning it breaks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import OpenAI

from idlefleet.agent.config import AgentConfig
from idlefleet.agent.runtime import Embedder
from idlefleet.agent.sources.trace import StateTrace, TraceSource
from idlefleet.agent.supervise import AgentTaskDied
from idlefleet.agent.worker import VehicleAgent
from idlefleet.cli.demo import batch_input
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.models.catalog import MINILM
from idlefleet.workloads.embeddings.runner import EmbeddingRunner
from tests.integration.conftest import submit


@pytest.mark.integration
def test_an_agent_whose_task_dies_releases_its_lease_and_stops_loudly(
    tmp_path: Path,
) -> None:
    with EmbeddedFleet(FleetOptions(data_dir=tmp_path, agents=0, lease_seconds=600)) as fleet:
        client = OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key, max_retries=0)
        config = AgentConfig(
            vehicle_id="car-broken",
            nats_url=fleet.nats_url,
            cache_dir=tmp_path / "models",
            resume_after_s=0,
            nkey_seed=fleet.enrol("car-broken"),
        )
        source = TraceSource(StateTrace.load(fleet.default_trace()), speed=60.0)
        runners = {MINILM.id: EmbeddingRunner(Embedder.load(config.cache_dir))}
        agent = VehicleAgent(config, runners, source)
        took: list[str] = []

        async def broken_plan(lease_id: str) -> None:
            took.append(lease_id)  # a unit arrives (the agent holds its lease) ...
            raise RuntimeError("a bug in the agent")  # ... and its code for it breaks

        agent._plan = broken_plan  # type: ignore[method-assign, assignment]

        async def scenario() -> BaseException | None:
            stop = asyncio.Event()
            run = asyncio.create_task(agent.run(stop))
            await asyncio.sleep(1.0)  # registered by now
            await asyncio.to_thread(fleet.set_consent, "car-broken", True)
            await asyncio.to_thread(submit, client, batch_input(["one", "two", "three"]))
            try:
                await asyncio.wait_for(run, timeout=60)
            except BaseException as exc:
                return exc
            return None

        raised = asyncio.run(scenario())
        leases = {le["id"]: le for le in fleet.get("/fleet/leases?all=true")["data"]}

    assert isinstance(raised, AgentTaskDied) and raised.name == "plan"
    assert isinstance(raised.cause, RuntimeError)
    # The unit the dead loop held went back at once, not after its 600 s lease.
    assert (leases[took[0]]["state"], leases[took[0]]["end_reason"]) == ("released", "shutdown")
