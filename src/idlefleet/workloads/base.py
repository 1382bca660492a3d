"""The workload interface: everything that knows the shape of one kind of work.

The engine (wire, store, dispatch, leases, agent loop) moves requests, results and bytes; a
:class:`Workload` is the only thing that reads them. A request enters as an OpenAI body and
leaves the workload as a :class:`Planned` request: a JSON ``payload`` the car runs, an
``options`` string the coordinator keeps for rendering, and a :class:`Cost` that sizes units
(and, later, prices them). A result comes back from the car as bytes in the workload's own
encoding, is checked against what the coordinator knows of its request before it is committed,
and is rendered into the OpenAI response at the end. The agent side is a :class:`UnitRunner`,
built only in the car (it loads models).

Adding a workload: a module (or package) under ``idlefleet/workloads/`` with a subclass of
:class:`Workload`, and one line in ``idlefleet/workloads/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlefleet.models.catalog import MODELS

if TYPE_CHECKING:
    from idlefleet.agent.compute_gate import ComputeGate
    from idlefleet.coordinator.store.base import StoredRequest

__all__ = [
    "Cost",
    "ItemResult",
    "OnlineStream",
    "Planned",
    "PlannedRun",
    "Probe",
    "RunOutcome",
    "UnitRunner",
    "Workload",
]


@dataclass(frozen=True, slots=True)
class Cost:
    """What a request will take, estimated at validation from its body alone."""

    inputs: int
    """Items the request holds (embedding inputs; 1 for a chat completion)."""
    input_bytes: int
    """UTF-8 bytes of its inputs."""
    tokens: int
    """Tokens it will consume at most (input and output), as far as the body says."""
    compute: int
    """Relative compute, in the workload's own unit; units lease the largest first (LPT)."""


@dataclass(frozen=True, slots=True)
class Planned:
    """A validated request, ready for the store or for one car."""

    model: str
    """Canonical model id (aliases resolved)."""
    payload: Any
    """What the car needs to run it: a JSON value only this workload reads."""
    options: str
    """What the coordinator keeps to render the response (opaque to everything else)."""
    cost: Cost
    job: Any = None
    """The workload's own parsed request (for rendering an online response)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Part of a finished request, re-run on another car to verify the first car's result.

    To the car that runs it, a probe is one more request of the workload in a unit (the same
    kind and model); its answer is judged against ``reference`` by :meth:`Workload.agree`."""

    payload: Any
    """What the verifying car runs: a payload of this workload."""
    reference: bytes
    """The first car's answer to it (a part of its result, in the workload's encoding)."""
    work: int
    """Its compute, in the workload's unit of work (embedding inputs, tokens): what verifying
    costs, for the overhead figures."""


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One finished request on the car."""

    data: bytes
    """The result in the workload's encoding (what ``Workload.check`` and ``render`` read)."""
    tokens: int


@dataclass(frozen=True)
class RunOutcome:
    """What became of a run of some requests: all done, some done before a stop, or refused."""

    results: Sequence[ItemResult | None]
    """Per request given, in order; None: it did not finish."""
    energy_j: float = 0.0
    refused: bool = False
    """The compute gate did not allow the run to start (nothing ran)."""
    stopped_at: float | None = None
    """perf_counter time at which the gate stopped the run, if it did."""
    ended_at: float = 0.0
    """perf_counter time at which the model run returned (or raised)."""

    @property
    def complete(self) -> bool:
        return not self.refused and all(r is not None for r in self.results)


@dataclass(frozen=True)
class PlannedRun:
    """One model run of a unit, as the runner planned it."""

    indices: list[int]
    """The unit's requests in this run (positions in the unit's ``items``)."""
    prepared: Any = None
    """What the runner worked out while planning (e.g. token counts), handed back to ``run``."""


class UnitRunner(ABC):
    """Runs one model of one workload on the car. Blocking: call on a compute thread."""

    model: str
    preferred_requests: int = 1
    """The fewest requests a unit should hold for this runner to run at full speed (an LLM
    engine's slots); the car asks for units of at least this many."""

    @property
    def provider(self) -> str | None:
        """The ONNX Runtime execution provider its session runs on, as the session says (what
        the car reports as ``Hardware.provider``); None: the runner does not say."""
        return None

    @abstractmethod
    def plan(self, payloads: Sequence[Any], max_requests: int) -> list[PlannedRun]:
        """Cut a unit (its requests' payloads) into runs of at most ``max_requests`` requests
        whose results fit one NATS message (``RESULT_CHUNK_BYTES``; a request whose result
        alone is more is a run of its own); every index in exactly one run. The order is the
        runner's (e.g. similar lengths together). May tokenise: it runs on the compute thread
        before any run, so that no run has to before it can be stopped."""

    @abstractmethod
    def run(
        self,
        gate: ComputeGate,
        payloads: Sequence[Any],
        lease_id: str | None,
        prepared: Any = None,
        progress: Sequence[bytes | None] | None = None,
        report: Callable[[list[tuple[int, bytes]]], None] | None = None,
        report_every_s: float | None = None,
    ) -> RunOutcome:
        """Run these requests if and while the gate allows it (``gate.begin``/``gate.end``
        around the model; a stop keeps what finished). ``prepared``: the plan's, if any.
        ``progress``: per request, what a car before reported of it (continue from there), or
        None. ``report``: call it now and then with (index, progress) of unfinished requests
        (long runs: the coordinator keeps it and extends the lease); short ones never do."""


class OnlineStream(ABC):
    """An online response streamed as its request runs: the events' JSON payloads (the API
    sends each as a server-sent event). Built per request by ``Workload.stream_online``."""

    @abstractmethod
    def start(self) -> list[dict[str, Any]]:
        """The events sent before the car has done anything."""

    @abstractmethod
    def progress(self, data: bytes) -> list[dict[str, Any]]:
        """The events for a car's progress (checked by ``check_progress``); ``ValueError`` if
        it does not follow what was streamed already (the car is refused, nothing is sent)."""

    @abstractmethod
    def result(self, data: bytes, tokens: int) -> list[dict[str, Any]]:
        """The last events, for the result (checked by ``check``); ``ValueError`` as above."""


class Workload(ABC):
    """One kind of work, end to end. Instances are stateless and shared."""

    kind: str
    """Wire and registry name, e.g. ``embeddings``."""
    endpoint: str
    """The OpenAI endpoint it serves, e.g. ``/v1/embeddings`` (also a batch's ``endpoint``)."""
    max_batch_inputs: int | None = None
    """A batch may hold at most this many inputs (``Cost.inputs`` summed); None: no bound."""

    # -- requests ------------------------------------------------------------------------------
    @abstractmethod
    def canonical_model(self, name: str) -> str | None:
        """The canonical id of a model name or alias this workload serves, or None."""

    @abstractmethod
    def plan(self, body: object) -> Planned:
        """Validate an OpenAI request body; raise ``IdlefleetError`` with OpenAI's shape and
        wording (400 ``InvalidRequest``, 404 ``NotFound`` for an unknown model)."""

    # -- results -------------------------------------------------------------------------------
    @abstractmethod
    def expectation(self, payload: Any) -> Any:
        """What checking a result of this request needs to know of it (small, kept per
        leased request), e.g. the number of inputs."""

    @abstractmethod
    def check(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        tokens: Sequence[int],
        data: bytes,
    ) -> str | None:
        """Why a chunk of results cannot belong to its requests, or None. Per request:
        its seq (for the message), ``expected`` (its payload's ``expectation``; None: not
        known here, and the commit will ignore it), the size of its result in ``data`` (the
        results concatenated) and the tokens reported. Runs on the coordinator before a
        commit, for a whole chunk at once: cheap and strict."""

    def check_progress(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        data: bytes,
    ) -> str | None:
        """Why a car's progress reports (``Progress``) cannot belong to these requests, or None;
        as :meth:`check`. A workload whose requests are short does not report progress: by
        default every report is refused."""
        return f"{self.kind} requests report no progress"

    def usage(self, result: bytes, tokens: int) -> tuple[int, int]:
        """What a finished request is billed for: (input tokens, output tokens). By default
        every token a car reported is input (embeddings)."""
        return tokens, 0

    # -- verification --------------------------------------------------------------------------
    @abstractmethod
    def work(self, payload: Any, result: bytes) -> int:
        """The compute a finished request took, in the workload's unit of work (as
        :attr:`Probe.work`): what verification's overhead is measured against."""

    @abstractmethod
    def probe(self, payload: Any, result: bytes, pick: int) -> Probe:
        """A probe of a finished request (its payload and committed result): a small part of it
        that another car re-runs. ``pick`` (a random non-negative int) chooses the part, so a
        car cannot know which part of its work will be checked."""

    @abstractmethod
    def agree(
        self, model: str, probe: Any, reference: bytes, answer: bytes, same_class: bool
    ) -> bool:
        """Whether another car's ``answer`` to a probe (its payload ``probe``) confirms the
        ``reference``. ``same_class``: both cars are of one hardware class (model digest,
        runtime, execution provider, precision), where results are compared at the tightest
        tolerance; across classes, at a tolerance calibrated between classes. Never by
        comparing sampled text: a generation is judged by how likely the answer's model finds
        it."""

    # -- responses -----------------------------------------------------------------------------
    @abstractmethod
    def render_batch(self, requests: Sequence[StoredRequest]) -> Mapping[int, bytes]:
        """The response bodies (JSON bytes) of finished requests, by seq. Called with blocks of
        up to a thousand requests, so a workload can render them in one pass."""

    @abstractmethod
    def render_online(self, planned: Planned, result: bytes, tokens: int) -> dict[str, Any]:
        """The response of an online request."""

    def stream_online(self, planned: Planned) -> OnlineStream | None:
        """The streamed response of an online request that asked for one (None: it did not,
        or this workload does not stream)."""
        return None

    # -- the car -------------------------------------------------------------------------------
    @abstractmethod
    def models(self) -> tuple[str, ...]:
        """Canonical ids of the models this workload serves."""

    @abstractmethod
    def model_files(self, model: str) -> dict[str, Path]:
        """The files a release of ``model`` is made of, by name (weights, tokenizer, config:
        data, never code), as this machine's packages hold them: what an operator signs and
        publishes, and what ``source`` holds on a car that fetched the release."""

    @abstractmethod
    def provision(self, model: str, cache_dir: Path, source: Path | None = None) -> None:
        """Put ``model``'s graph in the car's model cache (``cache_dir``), built once from the
        files in ``source`` (a verified release; None: this machine's packages); a no-op when
        an intact copy is there. ``runner`` does it too, if needed."""

    @abstractmethod
    def runner(
        self, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        """Build the car's runner of ``model`` from the files in ``source`` (as
        ``provision``), at the model's own precision; loads it. Agents build runners through
        :meth:`runner_at`."""

    def runner_at(
        self, precision: str, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        """The car's runner of ``model`` at ``precision`` (one of the catalogue's
        ``ModelInfo.precisions``, else ``ValueError``), as :meth:`runner`. A workload whose
        models run at more than their own precision overrides this."""
        own = MODELS[model].precisions[0] if model in MODELS else "fp32"
        if precision != own:
            raise ValueError(f"model {model} runs at {own} only, not {precision}")
        return self.runner(model, cache_dir, threads, source)
