"""The agent's decision core, bare: scripted stories, then random event sequences (hypothesis)
against the rules it promises: no run outside the gate's permit, no lost result, every lease
finished or released, one exit."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.agent.core import (
    AgentCore,
    BeatNow,
    Exit,
    Fetch,
    FetchAgain,
    FetchLater,
    Granted,
    Instruction,
    NotRegistered,
    NoWork,
    Plan,
    PlanFailed,
    Planned,
    Reconnected,
    Register,
    Registered,
    RegistrationFailed,
    Release,
    ReleaseDone,
    Run,
    RunEnded,
    RunFailed,
    Send,
    Sent,
    Started,
    Stop,
    VerdictChanged,
)


def ready(core: AgentCore) -> list[Instruction]:
    assert core.handle(Started()) == [Register(0.0)]
    # Its status goes out at once; not allowed yet: no work asked for.
    assert core.handle(Registered()) == [BeatNow()]
    return core.handle(VerdictChanged(True))


def test_a_unit_runs_reports_and_finishes() -> None:
    core = AgentCore(reserve=1)
    assert ready(core) == [BeatNow(), Fetch()]
    assert core.handle(Granted("L1")) == [Plan("L1"), Fetch()]  # one unit in hand ahead
    assert core.handle(Planned("L1", 2)) == [Run("L1", 0)]
    assert core.status == "working" and core.held == ["L1"]
    # The first run's results go out while the second computes.
    assert core.handle(RunEnded("L1", 0, finished=3, complete=True)) == [
        Send("L1", 0),
        Run("L1", 1),
    ]
    assert core.handle(Sent("L1", 0, lease_active=True)) == []
    assert core.handle(RunEnded("L1", 1, finished=2, complete=True)) == [Send("L1", 1)]
    # Finished once its last report is answered: no release (its commits ended the lease).
    assert core.handle(Sent("L1", 1, lease_active=True)) == []
    assert core.held == [] and core.status == "idle"


def test_the_reserve_unit_starts_when_the_running_one_finishes() -> None:
    core = AgentCore(reserve=1)
    ready(core)
    core.handle(Granted("L1"))
    core.handle(Planned("L1", 1))
    assert core.handle(Granted("L2")) == []  # two held: no more asking
    core.handle(RunEnded("L1", 0, finished=1, complete=True))
    assert core.handle(Sent("L1", 0, lease_active=True)) == [Plan("L2"), Fetch()]


def test_a_pause_stops_work_reports_what_finished_and_gives_everything_back() -> None:
    core = AgentCore(reserve=1)
    ready(core)
    core.handle(Granted("L1"))
    core.handle(Planned("L1", 3))
    core.handle(Granted("L2"))

    out = core.handle(VerdictChanged(False, "not_parked"))

    # The running unit is still in the model (the gate is stopping it): nothing released yet;
    # the reserve unit goes back at once.
    assert out == [BeatNow(), Release("L2", "preempted: not_parked")]
    assert core.status == "paused"
    out = core.handle(RunEnded("L1", 0, finished=2, complete=False))
    assert out == [Send("L1", 0)]  # what finished is reported first ...
    out = core.handle(Sent("L1", 0, lease_active=True))
    assert out == [Release("L1", "preempted: not_parked")]  # ... then the rest goes back
    assert core.handle(ReleaseDone("L2")) == []
    assert core.handle(ReleaseDone("L1")) == []
    assert core.held == []
    # Nothing is asked for until the gate allows again.
    assert core.handle(VerdictChanged(True)) == [BeatNow(), Fetch()]


def test_a_run_stopped_before_its_verdict_arrives_still_ends_the_unit() -> None:
    core = AgentCore(reserve=0)
    ready(core)
    core.handle(Granted("L1"))
    core.handle(Planned("L1", 2))
    out = core.handle(RunEnded("L1", 0, finished=0, complete=False))
    # (It asks for work again: the gate may have refused this one step only, e.g. on its energy
    # estimate; a verdict that forbids computing arrives as its own event.)
    assert out == [Release("L1", "preempted: stopped"), Fetch()]


def test_a_grant_the_car_refuses_goes_back_at_once() -> None:
    core = AgentCore(reserve=0)
    ready(core)
    out = core.handle(Granted("L1", refusal="policy: purpose advertising not allowed"))
    assert out == [Release("L1", "policy: purpose advertising not allowed"), Fetch()]


def test_a_failing_unit_is_released_as_an_error() -> None:
    core = AgentCore(reserve=0)
    ready(core)
    core.handle(Granted("L1"))
    assert core.handle(PlanFailed("L1", "ValueError: payload is not a list")) == [
        Release("L1", "error: ValueError: payload is not a list"),
        Fetch(),
    ]
    core.handle(Granted("L2"))
    core.handle(Planned("L2", 2))
    out = core.handle(RunFailed("L2", 0, "RuntimeError"))
    assert out == [Release("L2", "error: RuntimeError"), Fetch()]


def test_a_lease_the_coordinator_dropped_is_not_run_further_nor_released() -> None:
    core = AgentCore(reserve=0)
    ready(core)
    core.handle(Granted("L1"))
    core.handle(Planned("L1", 3))
    core.handle(RunEnded("L1", 0, finished=1, complete=True))  # Send 0, Run 1
    core.handle(Sent("L1", 0, lease_active=False))
    assert core.handle(RunEnded("L1", 1, finished=1, complete=True)) == [Send("L1", 1)]
    assert core.handle(Sent("L1", 1, lease_active=False)) == [Fetch()]
    assert core.held == []


def test_empty_polls_ask_again_and_waits_are_one_request_at_a_time() -> None:
    core = AgentCore(reserve=1)
    ready(core)
    assert core.handle(NoWork(0.0)) == [Fetch()]
    assert core.handle(NoWork(5.0)) == [FetchLater(5.0)]
    assert core.handle(VerdictChanged(False, "x")) == [BeatNow()]
    assert core.handle(VerdictChanged(False, "x")) == []  # nothing new to say
    assert core.handle(VerdictChanged(False, "y")) == [BeatNow()]  # why it is paused changed
    assert core.handle(VerdictChanged(True)) == [BeatNow()]  # the wait is still running
    assert core.handle(FetchAgain()) == [Fetch()]


def test_not_registered_registers_again_before_asking() -> None:
    core = AgentCore()
    ready(core)
    assert core.handle(NotRegistered()) == [Register(0.0)]
    assert core.handle(RegistrationFailed()) == [Register(1.0)]
    assert core.handle(Registered()) == [BeatNow(), Fetch()]


def test_a_reconnect_registers_again_without_a_second_work_request() -> None:
    core = AgentCore()
    ready(core)  # a Fetch is in flight
    assert core.handle(Reconnected()) == [Register(0.0)]
    # The Fetch in flight is still the only one.
    assert core.handle(Registered()) == [BeatNow()]
    assert core.handle(NoWork(0.0)) == [Fetch()]


def test_stop_reports_releases_and_exits_once() -> None:
    core = AgentCore(reserve=1)
    ready(core)
    core.handle(Granted("L1"))
    core.handle(Planned("L1", 2))
    core.handle(Granted("L2"))
    assert core.handle(Stop()) == [Release("L2", "shutdown")]
    assert core.handle(RunEnded("L1", 0, finished=4, complete=True)) == [Send("L1", 0)]
    assert core.handle(Sent("L1", 0, lease_active=True)) == [Release("L1", "shutdown")]
    assert core.handle(ReleaseDone("L1")) == []
    assert core.handle(ReleaseDone("L2")) == [Exit()]
    assert core.handle(VerdictChanged(True)) == []  # nothing after the exit


# -- random event sequences ---------------------------------------------------------------------


@dataclass
class World:
    """The shell and the coordinator, played at random: answers any instruction in flight."""

    core: AgentCore
    in_flight: list[Instruction] = field(default_factory=list)
    permit: bool = False
    """The last verdict given to the core."""
    stopped: bool = False
    leases: int = 0
    granted: set[str] = field(default_factory=set)
    runs: dict[str, int] = field(default_factory=dict)
    reported: set[tuple[str, int]] = field(default_factory=set)
    sent_acked: Counter[str] = field(default_factory=Counter)
    dropped: set[str] = field(default_factory=set)
    released: Counter[str] = field(default_factory=Counter)
    exits: int = 0

    def give(self, event: object) -> None:
        assert self.exits == 0 or not isinstance(event, Granted)
        out = self.core.handle(event)  # type: ignore[arg-type]
        if isinstance(event, RunEnded) and event.finished:
            # No lost result: a run that finished requests is reported in the same breath.
            assert Send(event.lease_id, event.run) in out
        for instruction in out:
            self.check(instruction)
            if not isinstance(instruction, BeatNow | Exit):
                self.in_flight.append(instruction)

    def check(self, instruction: Instruction) -> None:
        assert self.exits == 0, f"{instruction} after Exit"
        if isinstance(instruction, Exit):
            self.exits += 1
        if isinstance(instruction, Run):
            # The gate's permit: never a run the last verdict did not allow, nor after a stop.
            assert self.permit and not self.stopped
        if isinstance(instruction, Fetch):
            assert not any(isinstance(i, Fetch | FetchLater) for i in self.in_flight)
            assert not self.stopped
        if isinstance(instruction, Release):
            lease = instruction.lease_id
            # Released only once nothing of it is in flight (its reports answered first).
            assert not any(
                isinstance(i, Run | Plan | Send) and i.lease_id == lease for i in self.in_flight
            )
            self.released[lease] += 1
            assert self.released[lease] == 1, f"{lease} released twice"
        assert len(self.core.units) <= 1 + self.core.reserve

    def answer(self, index: int, outcome: int) -> None:
        instruction = self.in_flight.pop(index)
        if isinstance(instruction, Register):
            self.give(Registered() if outcome % 3 else RegistrationFailed())
        elif isinstance(instruction, Fetch):
            if outcome % 4 == 0:
                self.give(NoWork(float(outcome % 2)))
            elif outcome % 4 == 1 and not self.stopped:
                self.give(NotRegistered())
            else:
                self.leases += 1
                lease = f"L{self.leases}"
                refusal = "policy: no" if outcome % 7 == 0 else None
                if refusal is None:
                    self.granted.add(lease)
                else:
                    self.granted.add(lease)
                self.give(Granted(lease, refusal))
        elif isinstance(instruction, FetchLater):
            self.give(FetchAgain())
        elif isinstance(instruction, Plan):
            if outcome % 9 == 0:
                self.give(PlanFailed(instruction.lease_id, "bad"))
            else:
                self.runs[instruction.lease_id] = 1 + outcome % 3
                self.give(Planned(instruction.lease_id, self.runs[instruction.lease_id]))
        elif isinstance(instruction, Run):
            if outcome % 11 == 0:
                self.give(RunFailed(instruction.lease_id, instruction.run, "boom"))
                return
            # The real gate stops or refuses a run when the car may not compute.
            complete = self.permit and outcome % 5 != 0
            finished = (outcome % 3) if not complete else 1 + outcome % 3
            if finished:
                self.reported.add((instruction.lease_id, instruction.run))
            self.give(RunEnded(instruction.lease_id, instruction.run, finished, complete))
        elif isinstance(instruction, Send):
            active = outcome % 6 != 0
            if not active:
                self.dropped.add(instruction.lease_id)
            self.sent_acked[instruction.lease_id] += 1
            self.give(Sent(instruction.lease_id, instruction.run, active))
        elif isinstance(instruction, Release):
            self.give(ReleaseDone(instruction.lease_id))


steps = st.lists(
    st.tuples(
        st.sampled_from(["answer", "answer", "answer", "verdict", "reconnect"]),
        st.integers(0, 10_000),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(steps=steps, reserve=st.integers(0, 2), stop_at=st.integers(0, 120))
def test_random_event_sequences_keep_every_promise(
    steps: list[tuple[str, int]], reserve: int, stop_at: int
) -> None:
    world = World(AgentCore(reserve=reserve))
    world.give(Started())
    for n, (kind, value) in enumerate(steps):
        if n == stop_at and not world.stopped:
            world.stopped = True
            world.give(Stop())
        if kind == "verdict":
            world.permit = value % 2 == 0
            world.give(VerdictChanged(world.permit, "not_parked"))
        elif kind == "reconnect":
            world.give(Reconnected())
        elif world.in_flight:
            world.answer(value % len(world.in_flight), value)
    if not world.stopped:
        world.stopped = True
        world.give(Stop())
    # Drain: the world answers everything in flight (a shell cancels its waits on a stop).
    for n in range(10_000):
        if not world.in_flight:
            break
        world.answer(0, n)
    assert not world.in_flight
    assert world.exits == 1
    assert world.core.held == []
    for lease in world.granted:
        # Every lease ended: released once, or finished (every run reported) / dropped there.
        finished = lease in world.runs and all(
            (lease, r) in world.reported for r in range(world.runs[lease])
        )
        assert world.released[lease] == 1 or finished or lease in world.dropped, lease
        assert world.released[lease] <= 1
