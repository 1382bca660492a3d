"""The car's side of chat completions: a unit's generations on the continuous-batching engine.

A run is some requests (at most ``4 × slots``, so the engine refills its slots from the run's
own waiting ones); it holds one permit of the compute gate for all its decode steps, and
the gate's stop (the driver is back) is seen within one step: ONNX Runtime is terminated
mid-call, or the loop sees the flag between calls. Generations that finished are results; the
others are not, but every ``report_every_s`` the run reports their tokens so far (the agent sends
them as ``Progress``: the coordinator keeps them and extends the lease), and a request given its
progress continues from there (the tokens are the engine's prefix). Stop
sequences are matched on the decoded text after each step; the text is cut before the first
one and the generation ends with ``stop``.

A unit may also hold probes (``verify.py``): a payload with a ``completion`` another car
returned. A probe is not generated but re-read, in one prefill of prompt + completion
(``idlefleet.llm.scoring``); the run does its probes first (each is final at once, reports no
progress and takes no slot), then its generations.

Payloads come from the cloud, so they are checked here again: anything but the chat payload's
shape (``prompt`` ids inside the vocabulary, ``max_tokens`` ≥ 1, sampling values in range, up
to 4 stop strings; a probe's completion ids inside the vocabulary, at most ``max_tokens`` of
them, and a finish reason) is a ``ValueError``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idlefleet.agent.chunk_runner import RESULT_CHUNK_BYTES
from idlefleet.llm.engine import Engine, GenerationRequest
from idlefleet.llm.sampling import SamplingParams
from idlefleet.llm.scoring import score
from idlefleet.workloads.base import ItemResult, PlannedRun, RunOutcome, UnitRunner
from idlefleet.workloads.chat import FINISH_REASONS, encode_result
from idlefleet.workloads.chat.verify import BYTES_PER_ENTRY, encode_answer, is_probe

if TYPE_CHECKING:
    from idlefleet.agent.compute_gate import ComputeGate
    from idlefleet.models.gguf_llama import LlamaConfig

__all__ = ["ChatRunner"]

RESULT_BYTES_PER_TOKEN = 24
"""A generation's result bytes per token, as planned: its id in the JSON list (≤ 7 bytes) and
its text. SmolLM2's results average 11 bytes a token; 99% of its tokens' texts are at most 14
bytes JSON-escaped, the longest 82 — a run of unusually dense results may pass its estimate, and
still fits the NATS message, 4 x ``RESULT_CHUNK_BYTES`` in the embedded server."""
RUN_RESULT_BYTES = RESULT_CHUNK_BYTES * 3 // 4
"""A run's results at most (as estimated): they travel base64-encoded in one result chunk."""


@dataclass
class _Job:
    """One request of a run: a generation, or a probe (its ``completion`` re-read)."""

    request: GenerationRequest
    completion: list[int] | None = None
    """A probe's completion (None: a generation)."""
    end: bool = False
    """A probe of a completion that ended with ``stop``: the end of text is read too."""

    @property
    def result_bytes(self) -> int:
        """The most bytes its result should take (as planned)."""
        if self.completion is None:
            return 100 + RESULT_BYTES_PER_TOKEN * self.request.max_new_tokens
        return 30 + BYTES_PER_ENTRY * (len(self.completion) + self.end)

    @property
    def length(self) -> int:
        """Tokens it reads before its first new one (a probe: all it reads)."""
        return len(self.request.prompt) + len(self.completion or ())


class ChatRunner(UnitRunner):
    """Runs one llama model on an ONNX Runtime session. Blocking: call on a compute thread."""

    def __init__(
        self,
        model: str,
        session: Any,
        cfg: LlamaConfig,
        tokenizer: Any,
        stop_ids: frozenset[int],
        slots: int = 8,
        report_every_s: float = 5.0,
    ) -> None:
        self.model = model
        self.session = session
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.slots = slots
        self.preferred_requests = slots
        """A unit of fewer requests leaves slots empty (decode steps cost nearly as much)."""
        self.report_every_s = report_every_s
        """How often a run reports its unfinished generations' tokens (well inside a lease)."""

    def plan(self, payloads: Sequence[Any], max_requests: int) -> list[PlannedRun]:
        """Runs of up to ``4 × slots`` requests (and ``max_requests``) whose results fit one
        result chunk (``RUN_RESULT_BYTES``, as estimated), longest prompt first: the engine
        keeps its slots full until a run's last requests, so fewer, longer runs waste less.
        Probes go in as any request (a prefill of all they read; no slot)."""
        jobs = [self._job(f"{i}", p) for i, p in enumerate(payloads)]
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].length)
        size = max(1, min(max_requests, 4 * self.slots))
        runs: list[PlannedRun] = []
        run: list[int] = []
        used = 0
        for i in order:
            if run and (len(run) >= size or used + jobs[i].result_bytes > RUN_RESULT_BYTES):
                runs.append(PlannedRun(run))
                run, used = [], 0
            run.append(i)
            used += jobs[i].result_bytes
        if run:
            runs.append(PlannedRun(run))
        return runs

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
        jobs = [self._job(f"{lease_id}/{i}", p) for i, p in enumerate(payloads)]
        requests = [job.request for job in jobs]
        for i, earlier in enumerate(progress or ()):
            if earlier is not None and jobs[i].completion is None:  # a probe has none
                requests[i].prefix = _tokens_of(earlier, requests[i])
        stops = [tuple(p.get("stop") or ()) for p in payloads]
        step = gate.begin(lease_id)
        if step is None:
            return RunOutcome([None] * len(payloads), refused=True)
        engine = Engine(self.session, self.cfg, self.slots, run_options=step.options)
        index = {r.id: i for i, r in enumerate(requests)}
        tokens: list[list[int]] = [list(r.prefix) for r in requests]
        every = self.report_every_s if report_every_s is None else report_every_s
        reported_at = time.monotonic()
        finished: list[tuple[str, str] | None] = [None] * len(requests)
        answers: list[ItemResult | None] = [None] * len(requests)
        try:
            for i, job in enumerate(jobs):
                if job.completion is not None and not step.options.terminate:
                    answers[i] = self._probe(job, step.options)
            for job in jobs:
                if job.completion is None:
                    engine.add(job.request)
            while engine.busy and not step.options.terminate:
                for token in engine.step():
                    i = index[token.request]
                    if token.token is not None:
                        tokens[i].append(token.token)
                    if token.finish_reason is not None:
                        finished[i] = (token.finish_reason, self.tokenizer.decode(tokens[i]))
                    elif stops[i]:
                        cut = _cut_at_stop(self.tokenizer.decode(tokens[i]), stops[i])
                        if cut is not None:
                            finished[i] = ("stop", cut)
                            engine.cancel(token.request)
                if report is not None and time.monotonic() - reported_at >= every:
                    reported_at = time.monotonic()
                    _report(report, tokens, finished)
        except Exception:
            if not step.options.terminate:
                raise  # a real failure, not the gate's stop
        ended = time.perf_counter()
        if report is not None and step.options.terminate:
            _report(report, tokens, finished)  # what the stop cut short, to the last token
        energy = gate.end(step)
        results: list[ItemResult | None] = []
        for i, request in enumerate(requests):
            done = finished[i]
            if done is None:
                results.append(answers[i])  # a probe's answer, if it is one and finished
                continue
            reason, text = done
            if reason != "stop" or not stops[i]:
                cut = _cut_at_stop(text, stops[i]) if stops[i] else None
                if cut is not None:  # a stop string in the last token's text
                    reason, text = "stop", cut
            data = encode_result(tokens[i], text, reason, len(request.prompt))
            results.append(ItemResult(data, len(request.prompt) + len(tokens[i])))
        return RunOutcome(results, energy_j=energy, stopped_at=step.stopped_at, ended_at=ended)

    def _probe(self, job: _Job, run_options: Any) -> ItemResult:
        """A probe's answer: its completion re-read in one prefill."""
        assert job.completion is not None
        request = job.request
        scores = score(
            self.session,
            self.cfg,
            request.prompt,
            job.completion,
            request.params,
            request.key,
            self.stop_ids if job.end else frozenset(),
            run_options,
        )
        data = encode_answer(scores.misses, scores.logprobs)
        return ItemResult(data, len(request.prompt) + len(job.completion))

    def _job(self, request_id: str, payload: Any) -> _Job:
        request = self._request(request_id, payload)
        if not is_probe(payload):
            return _Job(request)
        completion = payload["completion"]
        if (
            not isinstance(completion, list)
            or len(completion) > request.max_new_tokens
            or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.cfg.vocab
                for t in completion
            )
        ):
            raise ValueError(
                f"chat probe {request_id}: completion must be at most max_tokens token ids"
            )
        reason = payload.get("finish_reason")
        if reason not in FINISH_REASONS:
            raise ValueError(f"chat probe {request_id}: finish_reason must be stop or length")
        return _Job(request, list(completion), end=reason == "stop")

    def _request(self, request_id: str, payload: Any) -> GenerationRequest:
        if not isinstance(payload, dict):
            raise ValueError(f"chat payload {request_id} must be an object")
        prompt = payload.get("prompt")
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(isinstance(t, int) and 0 <= t < self.cfg.vocab for t in prompt)
        ):
            raise ValueError(f"chat payload {request_id}: prompt must be token ids of the model")
        max_tokens = payload.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"chat payload {request_id}: max_tokens must be a positive integer")
        if len(prompt) + max_tokens > self.cfg.context:
            raise ValueError(f"chat payload {request_id}: beyond the context window")
        stop = payload.get("stop") or []
        if (
            not isinstance(stop, list)
            or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise ValueError(f"chat payload {request_id}: stop must be up to 4 strings")
        seed = payload.get("seed")
        params = SamplingParams(
            temperature=float(payload.get("temperature", 1.0)),
            top_p=float(payload.get("top_p", 1.0)),
            seed=None if seed is None else int(seed),
        )
        # The random stream: with a seed, the seed alone (the same request with the same seed
        # gives the same completion, as OpenAI intends); without, the nonce the coordinator put
        # in the payload, the same on every car that runs this request.
        nonce = payload.get("nonce")
        if seed is None and not isinstance(nonce, str):
            raise ValueError(f"chat payload {request_id}: a nonce is needed without a seed")
        key = "seeded" if seed is not None else f"nonce:{nonce}"
        return GenerationRequest(
            request_id, prompt, max_tokens, params, stop_ids=self.stop_ids, key=key
        )


def _report(
    report: Callable[[list[tuple[int, bytes]]], None],
    tokens: Sequence[Sequence[int]],
    finished: Sequence[tuple[str, str] | None],
) -> None:
    """Report the unfinished generations that have tokens."""
    parts = [(i, _progress_bytes(t)) for i, t in enumerate(tokens) if finished[i] is None and t]
    if parts:
        report(parts)


def _progress_bytes(tokens: Sequence[int]) -> bytes:
    return json.dumps({"tokens": list(tokens)}).encode("ascii")


def _tokens_of(progress: bytes, request: GenerationRequest) -> list[int]:
    """The tokens a car before reported (checked by the coordinator; checked again here)."""
    try:
        value = json.loads(progress)
    except ValueError:
        raise ValueError(f"chat progress of {request.id} is not JSON") from None
    tokens = value.get("tokens") if isinstance(value, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise ValueError(f"chat progress of {request.id} must be {{'tokens': [ids]}}")
    if len(tokens) > request.max_new_tokens:
        raise ValueError(f"chat progress of {request.id} is longer than its max_tokens")
    return list(tokens)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` up to the first stop sequence in it, or None if there is none."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else None
