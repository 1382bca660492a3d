"""The agent's shell with a scripted runner and a scripted coordinator, no network: what it
sends for a unit, when it gives a lease back, how a bug in it stops it, and how it answers
online requests. The runner's results are opaque bytes here, which is all the shell may know."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from idlefleet.agent import core
from idlefleet.agent.compute_gate import ComputeGate
from idlefleet.agent.config import AgentConfig
from idlefleet.agent.sources.base import StateListener, StateSource
from idlefleet.agent.supervise import AgentTaskDied
from idlefleet.agent.worker import VehicleAgent
from idlefleet.models.catalog import MINILM
from idlefleet.protocol.codec import decode, encode
from idlefleet.protocol.messages import (
    Progress,
    ProgressAck,
    RegisterReply,
    RegisterRequest,
    Release,
    ReleaseAck,
    ResultAck,
    ResultChunk,
    RunReply,
    RunRequest,
    WireModel,
    WorkGrant,
    WorkItem,
    WorkRequest,
    pack,
)
from idlefleet.protocol.subjects import Uplink
from idlefleet.workloads.base import ItemResult, PlannedRun, RunOutcome, UnitRunner


class ScriptedRunner(UnitRunner):
    """Payloads are strings; a result is the string's UTF-8 bytes, its tokens its length.
    Plans two requests a run, longest first, each run's number as ``prepared``."""

    model = MINILM.id

    def __init__(
        self,
        *,
        stop_in_run: int | None = None,
        refuse: bool = False,
        fail: bool = False,
        report: bool = False,
    ) -> None:
        self.stop_in_run = stop_in_run
        """In this run the gate 'stops' after the first request."""
        self.refuse = refuse
        self.fail = fail
        self.planned_with: list[int] = []
        self.ran: list[tuple[list[Any], str | None, Any]] = []
        self.progress_given: list[list[bytes | None]] = []
        self.report = report

    def plan(self, payloads: Sequence[Any], max_requests: int) -> list[PlannedRun]:
        self.planned_with.append(max_requests)
        order = sorted(range(len(payloads)), key=lambda i: -len(payloads[i]))
        return [PlannedRun(order[k : k + 2], k // 2) for k in range(0, len(order), 2)]

    def run(
        self,
        gate: ComputeGate,
        payloads: Sequence[Any],
        lease_id: str | None,
        prepared: Any = None,
        progress: Sequence[bytes | None] | None = None,
        report: Any = None,
        report_every_s: float | None = None,
    ) -> RunOutcome:
        self.ran.append((list(payloads), lease_id, prepared))
        self.progress_given.append(list(progress or []))
        if lease_id is not None:  # as a real run's gate step meters it, under the lease's id
            gate.meter.record(2.5, datetime.date(2026, 12, 2), lease_id)
        if self.report and report is not None:
            report([(0, b"half of " + payloads[0].encode())])
        if self.fail:
            raise ValueError("payload 0 is not what this runner reads")
        if self.refuse:
            return RunOutcome([None] * len(payloads), refused=True)
        results: list[ItemResult | None] = [ItemResult(p.encode(), len(p)) for p in payloads]
        if prepared == self.stop_in_run:
            results[1:] = [None] * (len(results) - 1)
            return RunOutcome(results, energy_j=1.0, stopped_at=1.0)
        return RunOutcome(results, energy_j=1.0)


class QuietSource(StateSource):
    def start(self, listener: StateListener) -> None:
        pass

    def stop(self) -> None:
        pass


class Coordinator:
    """Stands in for the agent's request/reply calls: records each message and answers it.
    Work requests get ``grants`` one by one, then wait (a long poll with nothing)."""

    def __init__(self, grants: list[WorkGrant] | None = None) -> None:
        self.sent: list[WireModel] = []
        self.grants = list(grants or [])
        self.changed = asyncio.Event()

    async def call(
        self, verb: Uplink, message: WireModel, reply_type: type, timeout: float = 0.0
    ) -> WireModel:
        self.sent.append(message)
        self.changed.set()
        if isinstance(message, WorkRequest):
            if self.grants:
                return self.grants.pop(0)
            await asyncio.Event().wait()  # the long poll: until the agent gives up on it
        if isinstance(message, ResultChunk):
            return ResultAck(committed=len(message.seqs), lease_active=True)
        if isinstance(message, Release):
            return ReleaseAck()
        if isinstance(message, Progress):
            return ProgressAck(recorded=len(message.seqs), lease_active=True)
        if isinstance(message, RegisterRequest):
            return RegisterReply(accepted=True)
        raise AssertionError(f"unexpected {verb}")

    def of(self, kind: type[WireModel]) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)


@pytest.fixture
def make_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    agents: list[VehicleAgent] = []

    def make(
        runner: UnitRunner, grants: list[WorkGrant] | None = None
    ) -> tuple[VehicleAgent, Coordinator]:
        config = AgentConfig(
            vehicle_id="car-1", nats_url="nats://127.0.0.1:4222", cache_dir=tmp_path
        )
        agent = VehicleAgent(config, {runner.model: runner}, QuietSource())
        coordinator = Coordinator(grants)
        monkeypatch.setattr(agent, "_call", coordinator.call)
        # The owner's policy is the gate's business (tested there): every unit is welcome.
        monkeypatch.setattr(agent, "_refusal", lambda grant: None)
        agents.append(agent)
        return agent, coordinator

    yield make
    for agent in agents:
        agent._compute.shutdown()
        agent._online.shutdown()


async def serve(agent: VehicleAgent, until: Callable[[], Awaitable[None]]) -> None:
    """Run the shell's decision loop (the car allowed to compute) until ``until`` returns,
    then stop it as ``run`` does: wind down (report, release, exit)."""
    agent._post(core.Started())
    agent._post(core.VerdictChanged(True))
    decide = asyncio.create_task(agent._decide())
    try:
        await until()
    finally:
        decide.cancel()
        with pytest.raises(asyncio.CancelledError):
            await decide
        await agent._wind_down()
    assert agent.core.exited and agent.core.held == []


def grant(payloads: list[str], model: str = MINILM.id, lease_id: str = "lease-1") -> WorkGrant:
    return WorkGrant(
        lease_id=lease_id,
        kind="embeddings",
        model=model,
        items=[WorkItem(seq=10 + i, payload=p) for i, p in enumerate(payloads)],
    )


UNIT = ["a", "bbb", "cc", "dddd", "e"]  # seqs 10..14; the runner plans [13, 11], [12, 10], [14]


def test_a_unit_goes_out_as_one_result_chunk_per_planned_run(make_agent: Any) -> None:
    runner = ScriptedRunner()
    agent, coordinator = make_agent(runner, [grant(UNIT)])

    asyncio.run(
        serve(agent, lambda: coordinator.until(lambda: len(coordinator.of(ResultChunk)) == 3))
    )

    assert runner.planned_with == [agent.config.chunk_requests]
    assert [prepared for _, _, prepared in runner.ran] == [0, 1, 2]
    chunks = coordinator.of(ResultChunk)
    assert [(c.seqs, c.sizes, c.token_counts) for c in chunks] == [
        ([13, 11], [4, 3], [4, 3]),
        ([12, 10], [2, 1], [2, 1]),
        ([14], [1], [1]),
    ]
    assert [c.data() for c in chunks] == [b"ddddbbb", b"cca", b"e"]
    assert all(c.lease_id == "lease-1" for c in chunks)
    assert coordinator.of(Release) == []  # finished: its commits ended the lease


def test_progress_a_run_reports_is_sent_and_progress_granted_reaches_the_runner(
    make_agent: Any,
) -> None:
    runner = ScriptedRunner(report=True)
    unit = grant(["aa", "b"])
    resumed = unit.model_copy(
        update={
            "items": [
                unit.items[0].model_copy(update={"progress_b64": pack(b"\x00earlier")}),
                unit.items[1],
            ]
        }
    )
    agent, coordinator = make_agent(runner, [resumed])

    asyncio.run(serve(agent, lambda: coordinator.until(lambda: bool(coordinator.of(ResultChunk)))))

    # The run got each request's progress as bytes (None: none), in the run's order.
    assert runner.progress_given == [[b"\x00earlier", None]]
    (report,) = coordinator.of(Progress)
    assert (report.lease_id, report.seqs, report.data()) == ("lease-1", [10], b"half of aa")


def test_a_stopped_run_sends_the_finished_requests_and_releases_the_rest(
    make_agent: Any,
) -> None:
    runner = ScriptedRunner(stop_in_run=1)
    agent, coordinator = make_agent(runner, [grant(UNIT)])

    asyncio.run(serve(agent, lambda: coordinator.until(lambda: bool(coordinator.of(Release)))))

    assert len(runner.ran) == 2  # nothing runs after the stop
    assert [(c.seqs, c.data()) for c in coordinator.of(ResultChunk)] == [
        ([13, 11], b"ddddbbb"),
        ([12], b"cc"),
    ]
    (release,) = coordinator.of(Release)
    assert release.lease_id == "lease-1" and release.reason.startswith("preempted: ")


def test_a_refused_run_sends_nothing_and_releases_the_lease(make_agent: Any) -> None:
    agent, coordinator = make_agent(ScriptedRunner(refuse=True), [grant(UNIT)])

    asyncio.run(serve(agent, lambda: coordinator.until(lambda: bool(coordinator.of(Release)))))

    assert coordinator.of(ResultChunk) == []
    (release,) = coordinator.of(Release)
    assert release.reason.startswith("preempted: ")


def test_a_runner_that_raises_fails_the_unit_not_the_car(make_agent: Any) -> None:
    runner = ScriptedRunner(fail=True)
    agent, coordinator = make_agent(runner, [grant(UNIT), grant(["x"], lease_id="lease-2")])

    asyncio.run(serve(agent, lambda: coordinator.until(lambda: len(coordinator.of(Release)) == 2)))

    assert [(r.lease_id, r.reason) for r in coordinator.of(Release)] == [
        ("lease-1", "error: ValueError"),
        ("lease-2", "error: ValueError"),
    ]


class HeldRunner(ScriptedRunner):
    """Its first run waits for ``hold`` (a model still computing when the stop comes)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()

    def run(
        self,
        gate: ComputeGate,
        payloads: Sequence[Any],
        lease_id: str | None,
        prepared: Any = None,
        progress: Sequence[bytes | None] | None = None,
        report: Any = None,
        report_every_s: float | None = None,
    ) -> RunOutcome:
        if not self.ran:
            self.hold.wait(5)
        return super().run(gate, payloads, lease_id, prepared, progress, report)


def test_a_stop_reports_the_run_in_progress_and_gives_back_every_lease(make_agent: Any) -> None:
    runner = HeldRunner()
    agent, coordinator = make_agent(runner, [grant(UNIT), grant(["zz"], lease_id="lease-2")])

    async def until() -> None:  # the first run is computing and the second unit is in reserve
        await coordinator.until(lambda: len(coordinator.of(WorkRequest)) == 2)
        await asyncio.sleep(0.1)
        assert runner.ran == [] and agent.core.held == ["lease-1", "lease-2"]
        asyncio.get_running_loop().call_later(0.2, runner.hold.set)  # the run ends after the stop

    asyncio.run(serve(agent, until))

    # The run in progress finished and was reported; nothing else ran; both leases went back.
    assert [prepared for _, _, prepared in runner.ran] == [0]
    assert [(c.lease_id, c.seqs) for c in coordinator.of(ResultChunk)] == [("lease-1", [13, 11])]
    assert [(r.lease_id, r.reason) for r in coordinator.of(Release)] == [
        ("lease-2", "shutdown"),
        ("lease-1", "shutdown"),
    ]


def test_a_bug_in_the_shell_stops_the_agent_visibly_and_releases_its_lease(
    make_agent: Any,
) -> None:
    agent, coordinator = make_agent(ScriptedRunner(), [grant(UNIT)])

    async def broken_plan(lease_id: str) -> core.Event:
        raise RuntimeError("a bug in the agent")

    agent._plan = broken_plan  # type: ignore[method-assign]

    async def scenario() -> None:
        agent._post(core.Started())
        agent._post(core.VerdictChanged(True))
        with pytest.raises(AgentTaskDied) as died:
            await asyncio.wait_for(agent._decide(), 5)
        assert died.value.name == "plan" and isinstance(died.value.cause, RuntimeError)
        await agent._wind_down()

    asyncio.run(scenario())

    (release,) = coordinator.of(Release)
    assert (release.lease_id, release.reason) == ("lease-1", "shutdown")
    assert agent.core.exited


def test_the_car_registers_and_asks_work_for_the_models_it_has_runners_for(
    make_agent: Any,
) -> None:
    agent, coordinator = make_agent(ScriptedRunner())

    asyncio.run(agent.register())

    (request,) = coordinator.of(RegisterRequest)
    assert request.models == [MINILM.id]


def test_a_grant_of_a_model_without_a_runner_is_refused_as_an_error(tmp_path: Path) -> None:
    config = AgentConfig(vehicle_id="car-1", nats_url="nats://127.0.0.1:4222", cache_dir=tmp_path)
    agent = VehicleAgent(config, {MINILM.id: ScriptedRunner()}, QuietSource())

    assert agent._refusal(grant(UNIT, model="other-model")) == (
        "error: no runner for model other-model"
    )
    assert agent._refusal(grant(UNIT)) == "policy: opted out"  # the default policy


def online_replies(
    agent: VehicleAgent, message: WireModel | bytes, reply: str = "_INBOX.test"
) -> tuple[list[RunReply], RunReply | None]:
    """The partial replies the agent published to the request's inbox, and its final one."""

    class Incoming:
        def __init__(self) -> None:
            self.data = message if isinstance(message, bytes) else encode(message)
            self.reply = reply
            self.response: bytes | None = None

        async def respond(self, data: bytes) -> None:
            self.response = data

    class Wire:
        def __init__(self) -> None:
            self.published: list[tuple[str, bytes]] = []

        async def publish(self, subject: str, data: bytes) -> None:
            self.published.append((subject, data))

    incoming, wire = Incoming(), Wire()
    agent.nc = wire  # type: ignore[assignment]  # a Client as far as online requests use it
    asyncio.run(agent._on_run(incoming))  # type: ignore[arg-type]  # a Msg as far as it reads
    assert {subject for subject, _ in wire.published} <= {reply}
    partials = [decode(RunReply, data) for _, data in wire.published]
    final = None if incoming.response is None else decode(RunReply, incoming.response)
    return partials, final


def online(agent: VehicleAgent, message: WireModel | bytes) -> RunReply:
    _, final = online_replies(agent, message)
    assert final is not None
    return final


def test_an_online_request_reports_progress_and_resumes_from_what_it_is_given(
    make_agent: Any,
) -> None:
    runner = ScriptedRunner(report=True)
    agent, _ = make_agent(runner)
    request = RunRequest(
        request_id="r1",
        kind="embeddings",
        model=MINILM.id,
        payload="xyz",
        progress_b64=pack(b"so far"),
        stream=True,
    )

    partials, final = online_replies(agent, request)

    assert runner.progress_given == [[b"so far"]]
    assert [(p.partial, p.progress()) for p in partials] == [(True, b"half of xyz")]
    assert final is not None and final.error is None and final.data() == b"xyz"


def test_an_online_request_stopped_midway_hands_back_its_progress(make_agent: Any) -> None:
    runner = ScriptedRunner(report=True, refuse=True)
    agent, _ = make_agent(runner)

    _, final = online_replies(
        agent, RunRequest(request_id="r1", kind="embeddings", model=MINILM.id, payload="xyz")
    )

    assert final is not None and final.error is not None
    assert final.error.code == "vehicle_paused"
    assert final.progress() == b"half of xyz"  # the next car goes on from here


def test_an_online_request_without_an_inbox_is_ignored(make_agent: Any) -> None:
    runner = ScriptedRunner()
    agent, _ = make_agent(runner)

    partials, final = online_replies(
        agent, RunRequest(request_id="r1", kind="embeddings", model=MINILM.id, payload="x"), ""
    )

    assert (partials, final, runner.ran) == ([], None, [])


def test_an_online_request_is_answered_with_its_result_bytes(make_agent: Any) -> None:
    runner = ScriptedRunner()
    agent, _ = make_agent(runner)

    reply = online(
        agent, RunRequest(request_id="r1", kind="embeddings", model=MINILM.id, payload="xyz")
    )

    assert reply.error is None
    assert (reply.data(), reply.token_count) == (b"xyz", 3)
    # Run under the request's id, so that its energy is metered apart and reported with it.
    assert runner.ran == [(["xyz"], "r1", None)]
    assert reply.energy_j == 2.5


@pytest.mark.parametrize(("kind", "model"), [("embeddings", "other-model"), ("chat", MINILM.id)])
def test_an_online_request_for_a_model_or_kind_not_here_is_refused(
    make_agent: Any, kind: str, model: str
) -> None:
    runner = ScriptedRunner()
    agent, _ = make_agent(runner)

    reply = online(agent, RunRequest(request_id="r1", kind=kind, model=model, payload="xyz"))

    assert reply.error is not None and reply.error.code == "unknown_model"
    assert runner.ran == []


@pytest.mark.parametrize(
    ("runner", "code"),
    [
        (ScriptedRunner(refuse=True), "vehicle_paused"),
        (ScriptedRunner(fail=True), "inference_failed"),
    ],
)
def test_an_online_request_the_car_cannot_finish_gets_an_error_reply(
    make_agent: Any, runner: ScriptedRunner, code: str
) -> None:
    agent, _ = make_agent(runner)

    reply = online(
        agent, RunRequest(request_id="r1", kind="embeddings", model=MINILM.id, payload="xy")
    )

    assert reply.error is not None and reply.error.code == code
    assert reply.data_b64 == ""


def test_an_online_message_that_does_not_parse_is_refused(make_agent: Any) -> None:
    agent, _ = make_agent(ScriptedRunner())

    reply = online(agent, b'{"request_id": "r1"}')

    assert reply.error is not None and reply.error.code == "bad_message"


def test_work_requests_ask_for_units_the_runner_runs_at_full_speed(make_agent: Any) -> None:
    runner = ScriptedRunner()
    runner.preferred_requests = 32  # an LLM engine's slots
    agent, coordinator = make_agent(runner)

    async def until() -> None:
        await coordinator.until(lambda: len(coordinator.of(WorkRequest)) >= 1)

    asyncio.run(serve(agent, until))

    (ask, *_) = coordinator.of(WorkRequest)
    assert (ask.min_requests, ask.max_requests) == (32, 256)
