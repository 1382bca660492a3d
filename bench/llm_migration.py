"""Token-level migration, measured: generations stopped mid-sentence and continued elsewhere
equal the uninterrupted ones.

The car's own chat runner (``idlefleet.workloads.chat.runner``) on SmolLM2-135M-Instruct runs
rounds of ``--batch`` chat requests (greedy and fixed-seed sampling, 48-160 new tokens). Each
round runs them once uninterrupted, then again as cars would: the first "car" is stopped after
a random number of decode steps (its gate stops it, as when the driver comes back), the
generations it left unfinished are continued by a second "car" from the progress it reported
(the tokens so far: what the coordinator keeps and hands on), batched with different companions
and in another order, which may itself be stopped and continued by a third. Every hand-over of
an unfinished generation with at least one token is one migration.

Prints migrations, how many completions equal the uninterrupted run token for token, and for
each that does not: where it first differs and the gap between the two best logits there in the
uninterrupted run (a near-tie, from a different summation order in another batch shape, is the
only acceptable cause). Same hardware class throughout (one machine, one graph).

Usage: ``python bench/llm_migration.py [--rounds 8] [--batch 16] [--seed 0] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL = "SmolLM2-135M-Instruct"
_TOPICS = [
    "a robot who learns to paint",
    "the history of bicycles",
    "why the sky is blue",
    "a cat that travels by train",
    "how electric cars charge",
    "a recipe for pancakes",
    "the planets of the solar system",
    "a lighthouse keeper's day",
]


class StopAfter:
    """A compute gate that allows a run and stops it after ``steps`` decode steps (counted by
    the runner's per-step reports), as the real gate does when the car must stop."""

    def __init__(self, gate: Any, steps: int | None) -> None:
        self.gate = gate
        self.steps = steps
        self.seen = 0
        self.step: Any = None

    def begin(self, lease_id: str | None = None) -> Any:
        self.step = self.gate.begin(lease_id)
        return self.step

    def end(self, step: Any) -> float:
        return float(self.gate.end(step))

    def on_step(self) -> None:
        self.seen += 1
        if self.steps is not None and self.seen >= self.steps:
            self.step.options.terminate = True


def _allowed_gate() -> Any:
    from idlefleet.agent.compute_gate import ComputeGate
    from idlefleet.agent.policy_guard import PolicyGuard
    from idlefleet.agent.sources.trace import parked_state
    from idlefleet.agent.vehicle_state import StateAssembler
    from idlefleet.protocol.policy import OwnerPolicy

    gate = ComputeGate(PolicyGuard(OwnerPolicy(opted_in=True), 0), time.time, rated_power_w=65.0)
    gate.on_reading(StateAssembler().apply(parked_state(), time.time()))
    return gate


def run(
    runner: Any,
    payloads: Sequence[dict[str, Any]],
    progress: Sequence[bytes | None],
    stop_after: int | None,
) -> tuple[list[dict[str, Any] | None], list[bytes | None]]:
    """One car's run: each request's result (None: unfinished) and its last progress."""
    gate = StopAfter(_allowed_gate(), stop_after)
    latest: list[bytes | None] = list(progress)

    def report(parts: list[tuple[int, bytes]]) -> None:
        for i, data in parts:
            latest[i] = data
        gate.on_step()

    outcome = runner.run(gate, list(payloads), "bench", None, list(progress), report, 0.0)
    results = [None if r is None else json.loads(r.data) for r in outcome.results]
    return results, latest


def logit_gap(session: Any, cfg: Any, prompt: list[int], tokens: list[int], at: int) -> float:
    """The gap between the two best logits for token ``at`` of the uninterrupted completion."""
    import numpy as np

    from idlefleet.models.llama_onnx import prefill_feed

    ids = prompt + tokens[:at]
    logits = session.run(["logits"], prefill_feed(cfg, ids, len(ids) - 1))[0][0, -1]
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="requests per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch < 2:
        parser.error("need --rounds >= 1 and --batch >= 2")

    import onnxruntime as ort

    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path
    from idlefleet.models.llama_onnx import build_llama_model
    from idlefleet.workloads.chat import CHAT
    from idlefleet.workloads.chat.runner import ChatRunner

    model = GGUFModel(smollm2_path())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    graph = build_llama_model(model.config, model.weights()).SerializeToString()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    runner = ChatRunner(
        MODEL, session, model.config, model.tokenizer(), frozenset({model.eos_id}), slots=8
    )
    rng = random.Random(args.seed)
    migrations = compared = same = 0
    differences: list[dict[str, Any]] = []
    started = time.perf_counter()
    for round_no in range(args.rounds):
        bodies = []
        for i in range(args.batch):
            topic = _TOPICS[(round_no * args.batch + i) % len(_TOPICS)]
            sampled = i % 2 == 1
            bodies.append(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Write about {topic}. ({i})"}],
                    "max_tokens": rng.randint(48, 160),
                    "temperature": 0.8 if sampled else 0,
                    **({"seed": rng.randint(0, 10**6)} if sampled else {}),
                }
            )
        payloads = [CHAT.plan(body).payload for body in bodies]
        reference, _ = run(runner, payloads, [None] * len(payloads), None)
        # Car 1 runs them all and stops; cars 2 and 3 take what is left, each with different
        # companions (a fresh request in front) and in reverse order.
        results, progress = run(runner, payloads, [None] * len(payloads), rng.randint(5, 60))
        for car in (2, 3):
            left = [i for i, r in enumerate(results) if r is None]
            if not left:
                break
            migrations += sum(1 for i in left if progress[i] is not None)
            order = list(reversed(left))
            companion = CHAT.plan(bodies[rng.randrange(len(bodies))]).payload
            stop = rng.randint(5, 60) if car == 2 else None
            got, latest = run(
                runner,
                [companion, *(payloads[i] for i in order)],
                [None, *(progress[i] for i in order)],
                stop,
            )
            for k, i in enumerate(order, start=1):
                results[i], progress[i] = got[k], latest[k]
        for i, (want, got_i) in enumerate(zip(reference, results, strict=True)):
            assert want is not None and got_i is not None
            compared += 1
            if want["tokens"] == got_i["tokens"]:
                same += 1
                continue
            at = next(
                (
                    k
                    for k, (a, b) in enumerate(zip(want["tokens"], got_i["tokens"], strict=False))
                    if a != b
                ),
                min(len(want["tokens"]), len(got_i["tokens"])),
            )
            gap = logit_gap(session, model.config, payloads[i]["prompt"], want["tokens"], at)
            differences.append({"round": round_no, "request": i, "position": at, "gap": gap})
        print(
            f"round {round_no + 1}/{args.rounds}: {migrations} migrations so far, "
            f"{same}/{compared} identical",
            flush=True,
        )
    seconds = time.perf_counter() - started
    print(
        f"{migrations} migrations over {compared} generations: {same} identical to the "
        f"uninterrupted run, {compared - same} different ({seconds:.0f} s)"
    )
    for d in differences:
        print(
            f"  round {d['round']} request {d['request']}: first differs at token "
            f"{d['position']}; top-2 logit gap there {d['gap']:.2e}"
        )
    figures = {
        "migrations": migrations,
        "generations": compared,
        "identical": same,
        "different": compared - same,
        "max_logit_gap_at_difference": max((d["gap"] for d in differences), default=None),
        "differences": differences,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
