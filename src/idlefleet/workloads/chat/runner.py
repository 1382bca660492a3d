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

Payloads come from the cloud, so they are checked here again: anything but the chat payload's
shape (``prompt`` ids inside the vocabulary, ``max_tokens`` ≥ 1, sampling values in range, up
to 4 stop strings) is a ``ValueError``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from idlefleet.llm.engine import Engine, GenerationRequest
from idlefleet.llm.sampling import SamplingParams
from idlefleet.workloads.base import ItemResult, PlannedRun, RunOutcome, UnitRunner
from idlefleet.workloads.chat import encode_result

if TYPE_CHECKING:
    from idlefleet.agent.compute_gate import ComputeGate
    from idlefleet.models.gguf_llama import LlamaConfig

__all__ = ["ChatRunner"]


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
        """Runs of up to ``4 × slots`` requests (and ``max_requests``), longest prompt first:
        the engine keeps its slots full until a run's last requests, so fewer, longer runs
        waste less."""
        requests = [self._request(f"{i}", p) for i, p in enumerate(payloads)]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))
        size = max(1, min(max_requests, 4 * self.slots))
        return [PlannedRun(order[k : k + size]) for k in range(0, len(order), size)]

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
        requests = [self._request(f"{lease_id}/{i}", p) for i, p in enumerate(payloads)]
        for i, earlier in enumerate(progress or ()):
            if earlier is not None:
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
        for request in requests:
            engine.add(request)
        try:
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
                results.append(None)
                continue
            reason, text = done
            if reason != "stop" or not stops[i]:
                cut = _cut_at_stop(text, stops[i]) if stops[i] else None
                if cut is not None:  # a stop string in the last token's text
                    reason, text = "stop", cut
            data = encode_result(tokens[i], text, reason, len(request.prompt))
            results.append(ItemResult(data, len(request.prompt) + len(tokens[i])))
        return RunOutcome(results, energy_j=energy, stopped_at=step.stopped_at, ended_at=ended)

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
