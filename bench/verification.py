"""Verification against cheating cars: how many are caught, how fast, what reaches the output,
and what checking costs.

A fleet of scripted cars works through the coordinator's real work protocol in one process
(``WorkService`` with its ``Verifier``, ``BatchService``, a SQLite store, the real finalisation
writing output files), on a simulated clock: one round = every car asks for a unit and answers
the one it got in the round before. The answers are real model outputs, computed before the run
for a corpus of texts: honest cars of two hardware classes (MiniLM in fp32, and with fp16
weights) answer with their class's vectors (as embedded in a batch, or alone: a probe's
batch differs from the original's, and ONNX Runtime's sums with it); cheaters corrupt a share
of their units (1%, 10%, 100%) in one of these ways, all of a corrupted unit's requests
(a cheater cannot tell a probe from a request):

- ``random``: random unit vectors (wrong vectors);
- ``smaller``: the vectors of a smaller model (MiniLM cut to its first 3 of 6 layers);
- ``shuffled``: another input's honest vector (a real vector, of the wrong text).

``--workload chat``: the same fleet on chat completions (SmolLM2-135M-Instruct, one hardware
class, max_tokens 24, greedy and sampled at 0.7 and 1 with a seed). Honest cars' generations and
their answers to probes (teacher-forced re-scoring) come from the car's own chat runner, each
distinct request once; cheaters return ``random_tokens`` (as many random token ids) or
``truncated`` output (the first half, claiming ``stop``), and answer the probes of a unit they
cheat on with zeros without running the model. A chat result in an output file is wrong if it
is one of the cheats' texts for that request.

Printed and in ``--json``:

- ``detection_rate``: share of cheaters (that returned at least one wrong unit) quarantined
  within ``--within`` (50) of their units, counted from their first wrong unit;
- ``units_to_quarantine_p99`` (and p50, max): those units, per cheater caught;
- ``wrong_in_output_rate``: wrong vectors in finalised output files / vectors in them (strict
  batches separately: ``wrong_in_strict_output``, and ``strict_leaks``: each wrong result in
  a strict batch's output with the car that made it and the verdicts recorded on it);
- ``honest_quarantined``: honest cars quarantined;
- ``overhead``: work re-run for verification / work committed, in steady state (the second
  half of the run, when the honest cars are trusted); the whole run's too.

Targets (issue #13): detection >= 99% within 50 units, wrong in output <= 1% (0 strict), 0 honest
quarantined, overhead <= 5%. Baselines in the same run: plain replication (every unit twice)
costs 100%; BOINC's adaptive replication without a floor is printed from the same trust counts.

    .venv/bin/python bench/verification.py                 # ~2-4 min on 2 cores
    .venv/bin/python bench/verification.py --workload chat
    .venv/bin/python bench/verification.py --json out.json --cheaters-per-kind 12
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from idlefleet.cli.demo import demo_texts
from idlefleet.coordinator.batches import BatchService
from idlefleet.coordinator.planner import UnitPolicy
from idlefleet.coordinator.store import Enrolment, open_store, sqlite_url
from idlefleet.coordinator.trust import TrustPolicy
from idlefleet.coordinator.verification import Verifier
from idlefleet.coordinator.work import WorkService
from idlefleet.models.catalog import MINILM, SMOLLM2
from idlefleet.protocol.messages import (
    Hardware,
    RegisterRequest,
    ResultChunk,
    WorkGrant,
    WorkRequest,
    pack,
)

CHEATS = ("random", "smaller", "shuffled")
RATES = (0.01, 0.10, 1.0)
DIM = MINILM.dim


# -- the model outputs ---------------------------------------------------------------------------
@dataclass
class Outputs:
    """Real vectors of every corpus text: per class, as embedded in a batch and alone."""

    texts: list[str]
    index: dict[str, int]
    batched: dict[str, np.ndarray]
    alone: dict[str, np.ndarray]
    smaller: np.ndarray
    seconds: float


def class_embedders(
    cache: Path, threads: int
) -> tuple[dict[str, Callable[[list[str]], np.ndarray]], Callable[[list[str]], np.ndarray]]:
    """The two honest classes (MiniLM with fp32 and with fp16 weights, as agents build them)
    and the cheat's smaller model (the first 3 of MiniLM's 6 layers)."""
    import onnxruntime as ort

    from idlefleet.agent.runtime import Embedder, load_tokenizer
    from idlefleet.models import minilm

    classes = {p: Embedder.load(cache, threads, precision=p) for p in ("fp32", "fp16")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model_dir = minilm.default_model_dir()
    small = Embedder(
        ort.InferenceSession(
            minilm.build_truncated_minilm(model_dir, 3), options, providers=["CPUExecutionProvider"]
        ),
        load_tokenizer(model_dir),
        model_sha256="truncated-3",
    )
    embed = {name: (lambda texts, e=e: e.embed(texts).vectors) for name, e in classes.items()}
    return embed, lambda texts: small.embed(texts).vectors


def compute_outputs(n: int, cache: Path, threads: int) -> Outputs:
    start = time.perf_counter()
    texts = sorted(set(demo_texts(n * 2, seed=13)))[:n]
    embedders, smaller = class_embedders(cache, threads)
    batched, alone = {}, {}
    for name, embed in embedders.items():
        batched[name] = embed(texts)
        # Alone: each text in a micro-batch of its own (a probe's batch is another).
        alone[name] = np.concatenate([embed([t]) for t in texts])
    return Outputs(
        texts,
        {t: i for i, t in enumerate(texts)},
        batched,
        alone,
        smaller(texts),
        time.perf_counter() - start,
    )


# -- the fleet -----------------------------------------------------------------------------------
@dataclass
class Car:
    id: str
    owner: str
    klass: str
    cheat: str | None = None
    rate: float = 0.0
    units: int = 0
    wrong_units: int = 0
    first_wrong: int | None = None
    quarantined_after: int | None = None
    """Its units from its first wrong one (inclusive) to its quarantine."""
    quarantined_before_cheating: bool = False
    grant: WorkGrant | None = None
    done: bool = False

    @property
    def honest(self) -> bool:
        return self.cheat is None


@dataclass
class Run:
    cars: list[Car]
    rounds: int = 0
    batches: list[str] = field(default_factory=list)
    strict: set[str] = field(default_factory=set)
    texts_of: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Per batch: custom_id -> its texts (dropped once the batch is tallied)."""
    tally: Counter[str] = field(default_factory=Counter)
    """What reached finalised output files: wrong / total, strict batches apart."""
    statuses: Counter[str] = field(default_factory=Counter)
    tallied: set[str] = field(default_factory=set)
    strict_leaks: list[dict[str, Any]] = field(default_factory=list)
    """Wrong results that reached a strict batch's output: who made them, who agreed."""


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


RUNNING = ("validating", "in_progress", "finalizing")


def _status(store: Any, batch_id: str) -> str:
    batch = store.get_batch(batch_id)
    return "gone" if batch is None else str(batch.status)


def make_cars(
    args: argparse.Namespace, rng: random.Random, cheats: tuple[str, ...], classes: tuple[str, ...]
) -> list[Car]:
    cars: list[Car] = []
    for i in range(args.honest):
        cars.append(Car(f"honest-{i:03d}", f"owner-h{i // 2}", classes[i % len(classes)]))
    for cheat in cheats:
        for rate in RATES:
            for j in range(args.cheaters_per_kind):
                name = f"{cheat}-{int(rate * 100):03d}-{j:02d}"
                klass = classes[j % len(classes)]
                cars.append(Car(name, f"owner-{name}", klass, cheat=cheat, rate=rate))
    rng.shuffle(cars)
    return cars


def batch_lines(
    texts: list[str], rng: random.Random, requests: int, max_inputs: int
) -> tuple[bytes, dict[str, list[str]]]:
    lines, by_id = [], {}
    for i in range(requests):
        inputs = rng.sample(texts, rng.randint(1, max_inputs))
        custom_id = f"req-{i}"
        by_id[custom_id] = inputs
        lines.append(
            orjson.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": MINILM.id, "input": inputs},
                }
            )
        )
    return b"\n".join(lines) + b"\n", by_id


@dataclass
class Workload:
    """What the fleet works on: the batches' lines, the cars' answers, what counts as wrong
    in an output file."""

    model: str
    endpoint: str
    cheats: tuple[str, ...]
    classes: tuple[str, ...]
    lines: Callable[[random.Random, int], tuple[bytes, dict[str, Any]]]
    """(input file, what checking each custom_id's output needs)."""
    answer: Callable[[Car, WorkGrant, random.Random], tuple[ResultChunk, bool]]
    wrong: Callable[[Any, dict[str, Any]], tuple[int, int]]
    """(wrong, all) results in one output line, given what ``lines`` kept of its request."""
    model_seconds: Callable[[], float]


def embeddings_fleet(args: argparse.Namespace, out: Outputs) -> Workload:
    def wrong(kept: Any, row: dict[str, Any]) -> tuple[int, int]:
        body = row["response"]["body"]
        vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
        idx = [out.index[t] for t in kept]
        best = np.max(
            [np.einsum("ij,ij->i", vectors, out.batched[k][idx]) for k in out.batched], axis=0
        )
        return int((best < 0.99).sum()), len(idx)

    return Workload(
        MINILM.id,
        "/v1/embeddings",
        CHEATS,
        ("fp16", "fp32"),
        lambda rng, n: batch_lines(out.texts, rng, n, args.max_inputs),
        lambda car, grant, rng: answer(car, grant, out, rng),
        wrong,
        lambda: out.seconds,
    )


class ChatModel:
    """SmolLM2-135M-Instruct run by the car's own chat runner (the engine, the re-scoring of
    probes), each distinct request once: a request's payload fixes its completion (a seed is
    always given, so the coordinator's nonce does not matter), and a probe's fixes its answer."""

    def __init__(self, cache: Path, threads: int) -> None:
        from idlefleet.agent.compute_gate import ComputeGate
        from idlefleet.agent.policy_guard import PolicyGuard
        from idlefleet.agent.sources.trace import parked_state
        from idlefleet.agent.vehicle_state import StateAssembler
        from idlefleet.protocol.policy import OwnerPolicy
        from idlefleet.workloads import WORKLOADS

        self.runner: Any = WORKLOADS["chat"].runner_at("fp32", SMOLLM2.id, cache, threads)
        self.gate = ComputeGate(
            PolicyGuard(OwnerPolicy(opted_in=True), 0), time.time, rated_power_w=65.0
        )
        self.gate.on_reading(StateAssembler().apply(parked_state(), time.time()))
        self.done: dict[str, bytes] = {}
        self.seconds = 0.0

    @staticmethod
    def key(payload: dict[str, Any]) -> str:
        return orjson.dumps({k: v for k, v in payload.items() if k != "nonce"}).decode()

    def results(self, payloads: list[dict[str, Any]]) -> list[bytes]:
        """Each payload's honest result (a generation, or a probe's answer)."""
        keys = [self.key(p) for p in payloads]
        todo = {k: p for k, p in zip(keys, payloads, strict=True) if k not in self.done}
        if todo:
            start = time.perf_counter()
            outcome = self.runner.run(self.gate, list(todo.values()), "bench")
            self.seconds += time.perf_counter() - start
            for k, item in zip(todo, outcome.results, strict=True):
                assert item is not None, "the bench's gate never stops a run"
                self.done[k] = item.data
        return [self.done[k] for k in keys]


CHAT_CHEATS = ("random_tokens", "truncated")
CHAT_PROMPTS = (
    "Name a colour of the sky.",
    "Write one sentence about electric cars.",
    "What is two plus three?",
    "Give a synonym for quick.",
    "Say hello in French.",
    "Name a planet of the solar system.",
    "What do bees make?",
    "Describe rain in five words.",
    "Name a fruit that is yellow.",
    "What is the capital of Italy?",
    "Suggest a name for a cat.",
    "What is water made of?",
)


def chat_fleet(args: argparse.Namespace, model: ChatModel) -> Workload:
    """Chat completions (SmolLM2): honest cars return the runner's generations and answer
    probes with its re-scoring; cheaters return random tokens or a completion cut in half
    claiming ``stop``, and answer probes they cheat on with zeros (without running a model)."""
    from idlefleet.workloads import WORKLOADS
    from idlefleet.workloads.chat import encode_result
    from idlefleet.workloads.chat.verify import encode_answer, is_probe, limits_of

    chat = WORKLOADS["chat"]
    tokenizer = model.runner.tokenizer
    vocab = int(tokenizer.get_vocab_size())
    cheated: dict[str, set[str]] = {}
    """Per request (payload key): the texts of the wrong results cars returned for it."""

    def body(i: int) -> dict[str, Any]:
        prompt = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
        return {
            "model": SMOLLM2.id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.chat_tokens,
            "temperature": (0.0, 0.7, 1.0)[i % 3],
            "seed": i,
        }

    def lines(rng: random.Random, n: int) -> tuple[bytes, dict[str, Any]]:
        out, kept = [], {}
        for i in range(n):
            request = body(rng.randrange(args.corpus))
            custom_id = f"req-{i}"
            kept[custom_id] = ChatModel.key(chat.plan(request).payload)
            out.append(
                orjson.dumps(
                    {
                        "custom_id": custom_id,
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": request,
                    }
                )
            )
        return b"\n".join(out) + b"\n", kept

    def cheat(car: Car, payload: dict[str, Any], honest: bytes) -> bytes:
        if is_probe(payload):  # an answer made up without running the model
            entries = limits_of(payload).entries
            return encode_answer([0.0] * entries, [-0.5] * entries)
        value = json.loads(honest)
        tokens = value["tokens"]
        if car.cheat == "random_tokens":
            draw = random.Random(f"{ChatModel.key(payload)}:{car.id}")
            tokens = [draw.randrange(vocab) for _ in tokens]
        else:  # truncated: the first half, claiming the model stopped there
            tokens = tokens[: max(1, len(tokens) // 2)]
        text = tokenizer.decode(tokens)
        if text != value["text"]:
            cheated.setdefault(ChatModel.key(payload), set()).add(text)
        return encode_result(tokens, text, "stop", value["prompt_tokens"])

    def answer_chat(car: Car, grant: WorkGrant, rng: random.Random) -> tuple[ResultChunk, bool]:
        corrupt = car.cheat is not None and rng.random() < car.rate
        payloads = [item.payload for item in grant.items]
        honest = model.results(payloads)  # type: ignore[arg-type]
        datas, tokens = [], []
        for payload, data in zip(payloads, honest, strict=True):
            assert isinstance(payload, dict)
            made = cheat(car, payload, data) if corrupt else data
            datas.append(made)
            if is_probe(payload):
                tokens.append(limits_of(payload).tokens)
            else:
                value = json.loads(made)
                tokens.append(value["prompt_tokens"] + len(value["tokens"]))
        chunk = ResultChunk(
            lease_id=grant.lease_id or "",
            seqs=[item.seq for item in grant.items],
            token_counts=tokens,
            sizes=[len(d) for d in datas],
            data_b64=pack(b"".join(datas)),
        )
        return chunk, corrupt

    def wrong(kept: Any, row: dict[str, Any]) -> tuple[int, int]:
        text = row["response"]["body"]["choices"][0]["message"]["content"]
        return int(text in cheated.get(kept, ())), 1

    return Workload(
        SMOLLM2.id,
        "/v1/chat/completions",
        CHAT_CHEATS,
        ("fp32",),
        lines,
        answer_chat,
        wrong,
        lambda: model.seconds,
    )


def answer(
    car: Car, grant: WorkGrant, out: Outputs, rng: random.Random
) -> tuple[ResultChunk, bool]:
    """The car's results of every item of its unit (wrong ones if it cheats on this unit)."""
    corrupt = car.cheat is not None and rng.random() < car.rate
    seqs, sizes, tokens, parts = [], [], [], []
    for item in grant.items:
        texts = item.payload
        assert isinstance(texts, list)
        idx = [out.index[t] for t in texts]
        if not corrupt:
            table = out.batched[car.klass] if rng.random() < 0.5 else out.alone[car.klass]
            rows = table[idx]
        elif car.cheat == "random":
            rows = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((len(idx), DIM))
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        elif car.cheat == "smaller":
            rows = out.smaller[idx]
        else:  # shuffled: another text's honest vector
            other = [(i + 1 + rng.randrange(len(out.texts) - 1)) % len(out.texts) for i in idx]
            rows = out.batched[car.klass][other]
        data = np.ascontiguousarray(rows, dtype="<f4").tobytes()
        seqs.append(item.seq)
        sizes.append(len(data))
        tokens.append(len(idx) * 8)
        parts.append(data)
    blob = b"".join(parts)
    chunk = ResultChunk(
        lease_id=grant.lease_id or "",
        seqs=seqs,
        token_counts=tokens,
        sizes=sizes,
        data_b64=pack(blob),
    )
    return chunk, corrupt


def run(args: argparse.Namespace, fleet: Workload) -> dict[str, Any]:
    """One run on a fresh SQLite store in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as tmp:
        store = open_store(sqlite_url(Path(tmp) / "c.db"))
        try:
            return run_on(args, fleet, store)
        finally:
            store.close()


def run_on(args: argparse.Namespace, fleet: Workload, store: Any) -> dict[str, Any]:
    rng = random.Random(args.seed)
    clock = Clock()
    batches = BatchService(store, clock=clock)
    policy = TrustPolicy(floor=args.floor)
    work = WorkService(
        store,
        batches,
        UnitPolicy(min_requests=args.unit, max_requests=args.unit, lease_seconds=60),
        clock=clock,
    )
    verifier = Verifier(store, policy, clock=clock, rng=random.Random(args.seed + 1))
    work.verifier = verifier
    batches.finalize_gate = verifier.may_finalize
    cars = make_cars(args, rng, fleet.cheats, fleet.classes)
    by_id = {c.id: c for c in cars}
    for i, car in enumerate(cars):
        store.enrol(Enrolment(car.id, f"U{i:055d}", car.owner, clock.now, None, None))
        work.owners.set_consent(car.id, True, "owner:bench")
        work.register(
            car.id,
            RegisterRequest(
                protocol_version=1,
                agent_version="bench",
                hardware=Hardware(
                    accelerator="cpu", tops=1, memory_gb=4, power_w=65, precision=car.klass
                ),
                models=[fleet.model],
            ),
        )
    state = Run(cars)
    ask = WorkRequest(max_requests=args.unit, min_requests=args.unit, models=[fleet.model])
    snapshot: Counter[str] | None = None
    pending: list[tuple[str, ResultChunk]] = []
    creating = True
    open_batches: list[str] = []
    max_rounds = args.max_rounds
    while state.rounds < max_rounds:
        state.rounds += 1
        clock.now += 1.0
        still = [b for b in open_batches if _status(store, b) in RUNNING]
        for batch_id in set(open_batches) - set(still):
            tally(state, fleet, store, batches, batch_id)
        open_batches = still
        if creating and len(open_batches) < 3:
            lines, texts_of = fleet.lines(rng, args.batch_requests)
            record = batches.upload_file("in.jsonl", "batch", lines)
            strict = len(state.batches) % args.strict_every == args.strict_every - 1
            batch = batches.create_batch(
                record.id,
                fleet.endpoint,
                "24h",
                metadata={"verification": "strict"} if strict else None,
            )
            batches.validate(batch.id)
            state.batches.append(batch.id)
            open_batches.append(batch.id)
            state.texts_of[batch.id] = texts_of
            if strict:
                state.strict.add(batch.id)
        asking = [c for c in cars if not c.done]
        _, ended, grants = work.turn(pending, [(c.id, ask) for c in asking])
        pending = []
        for car, grant in zip(asking, grants, strict=True):
            if verifier.is_quarantined(car.id):
                if car.quarantined_after is None:
                    if car.first_wrong is None:
                        car.quarantined_before_cheating = True
                        car.quarantined_after = 0
                    else:
                        car.quarantined_after = car.units - car.first_wrong + 1
                car.done = True
                continue
            if grant is None or grant.lease_id is None:
                continue
            chunk, corrupt = fleet.answer(car, grant, rng)
            car.units += 1
            if corrupt:
                car.wrong_units += 1
                if car.first_wrong is None:
                    car.first_wrong = car.units
            pending.append((car.id, chunk))
        for batch_id in ended:
            batches.maybe_finalize(batch_id)
        if state.rounds % 5 == 0:
            batches.sweep()
            verifier.refresh()
        cheaters = [c for c in cars if not c.honest]
        if creating and all(
            c.done
            or (c.first_wrong is not None and c.units - c.first_wrong + 1 > args.within)
            or c.units >= args.max_units
            for c in cheaters
        ):
            creating = False  # every cheater resolved: finish the batches
            max_rounds = state.rounds + args.drain_rounds
        if snapshot is None and state.rounds >= args.warmup:
            snapshot = Counter(verifier.counters)
        if not creating and not open_batches:
            break
    for batch_id in state.batches:
        batches.maybe_finalize(batch_id)
        tally(state, fleet, store, batches, batch_id)
    return summarise(args, state, fleet, verifier, snapshot or Counter(), by_id)


def _leaks(store: Any, batch_id: str, custom_ids: set[str]) -> list[dict[str, Any]]:
    """For wrong results in a strict batch's output: the car whose result it is and the
    verdicts recorded on it (a diagnosis of how it got through)."""
    made = {
        r.seq: (r.custom_id, r.vehicle_id)
        for r in store.iter_requests(batch_id)
        if r.custom_id in custom_ids
    }
    found: dict[int, list[tuple[str, str, str | None]]] = {}
    for v in store.list_verdicts(batch_id):
        if v.seq in made:
            found.setdefault(v.seq, []).append((v.vehicle_id, v.verdict, v.verifier_id))
    return [
        {"batch": batch_id, "seq": seq, "car": car, "custom_id": cid, "verdicts": found.get(seq)}
        for seq, (cid, car) in sorted(made.items())
    ]


def tally(state: Run, fleet: Workload, store: Any, batches: BatchService, batch_id: str) -> None:
    """Count what reached ``batch_id``'s output file (checked against every honest class's
    answer), once, and delete its files: a long run would otherwise keep tens of GB."""
    if batch_id in state.tallied:
        return
    state.tallied.add(batch_id)
    batch = store.get_batch(batch_id)
    state.statuses[batch.status] += 1
    kind = "strict" if batch_id in state.strict else "plain"
    if batch.output_file_id is not None:
        content = b"".join(batches.file_content(batch.output_file_id))
        wrong_ids = []
        for line in content.splitlines():
            row = orjson.loads(line)
            bad, n = fleet.wrong(state.texts_of[batch_id][row["custom_id"]], row)
            state.tally[f"wrong_{kind}"] += bad
            state.tally[f"total_{kind}"] += n
            if bad and kind == "strict":
                wrong_ids.append(row["custom_id"])
        if wrong_ids:
            state.strict_leaks.extend(_leaks(store, batch_id, set(wrong_ids)))
    for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            store.delete_file(file_id)
    state.texts_of.pop(batch_id, None)


def summarise(
    args: argparse.Namespace,
    state: Run,
    fleet: Workload,
    verifier: Verifier,
    snapshot: Counter[str],
    by_id: dict[str, Car],
) -> dict[str, Any]:
    cheaters = [c for c in state.cars if not c.honest]
    cheated = [c for c in cheaters if c.first_wrong is not None]
    caught = [
        c for c in cheated if c.quarantined_after is not None and c.quarantined_after <= args.within
    ]
    units = sorted(c.quarantined_after for c in cheated if c.quarantined_after is not None)
    honest_q = [c.id for c in state.cars if c.honest and c.quarantined_after is not None]
    wrong, total = state.tally["wrong_plain"], state.tally["total_plain"]
    wrong_strict, total_strict = state.tally["wrong_strict"], state.tally["total_strict"]
    statuses = state.statuses
    now = verifier.counters
    steady_work = now["work"] - snapshot["work"]
    steady_probe = now["probe_work"] - snapshot["probe_work"]
    per_kind: dict[str, Any] = {}
    for cheat in fleet.cheats:
        for rate in RATES:
            group = [c for c in cheaters if c.cheat == cheat and c.rate == rate]
            per_kind[f"{cheat}@{rate:g}"] = {
                "cars": len(group),
                "cheated": sum(c.first_wrong is not None for c in group),
                "caught_within": sum(
                    c.quarantined_after is not None and c.quarantined_after <= args.within
                    for c in group
                    if c.first_wrong is not None
                ),
                "units_to_quarantine": [c.quarantined_after for c in group],
            }
    return {
        "cars": {"honest": sum(c.honest for c in state.cars), "cheaters": len(cheaters)},
        "rounds": state.rounds,
        "workload": fleet.endpoint,
        "outputs_seconds": round(fleet.model_seconds(), 1),
        "detection_rate": len(caught) / len(cheated) if cheated else None,
        "cheaters_that_cheated": len(cheated),
        "cheaters_never_wrong": len(cheaters) - len(cheated),
        "units_to_quarantine_p50": statistics.median(units) if units else None,
        "units_to_quarantine_p99": _p99(units),
        "units_to_quarantine_max": max(units) if units else None,
        "wrong_in_output": wrong,
        "results_in_output": total,
        "wrong_in_output_rate": wrong / total if total else 0.0,
        "wrong_in_strict_output": wrong_strict,
        "strict_leaks": state.strict_leaks[:200],
        "results_in_strict_output": total_strict,
        "honest_quarantined": len(honest_q),
        "honest_quarantined_ids": honest_q,
        "overhead": steady_probe / steady_work if steady_work else None,
        "overhead_whole_run": now["probe_work"] / now["work"] if now["work"] else None,
        "strict_overhead": (
            now["probe_work_strict"] / now["work_strict"] if now["work_strict"] else None
        ),
        "plain_replication_overhead": 1.0,
        "batches": dict(statuses),
        "counters": {k: v for k, v in now.items() if ":" not in k},
        "per_kind": per_kind,
    }


def _p99(values: list[int]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered) + 0.5) - 1)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        choices=("embeddings", "chat"),
        default="embeddings",
        help="the fleet's work: embeddings (MiniLM, two hardware classes) or chat completions "
        "(SmolLM2, re-scored by teacher forcing)",
    )
    parser.add_argument("--honest", type=int, default=24, help="honest cars (half per class)")
    parser.add_argument(
        "--cheaters-per-kind", type=int, default=6, help="cheating cars per (cheat, rate): 9 kinds"
    )
    parser.add_argument(
        "--corpus",
        type=int,
        default=None,
        help="distinct texts (embeddings; default 1000) or requests (chat; default 36)",
    )
    parser.add_argument("--unit", type=int, default=None, help="requests per unit (default 32)")
    parser.add_argument("--chat-tokens", type=int, default=24, help="max_tokens of chat requests")
    parser.add_argument("--max-inputs", type=int, default=8, help="inputs per request, at most")
    parser.add_argument("--batch-requests", type=int, default=None, help="default 8000; chat 300")
    parser.add_argument("--strict-every", type=int, default=4, help="every n-th batch is strict")
    parser.add_argument("--floor", type=float, default=0.02)
    parser.add_argument("--within", type=int, default=50)
    parser.add_argument(
        "--max-units",
        type=int,
        default=600,
        help="a cheater that has not cheated after this many units is let be",
    )
    parser.add_argument("--max-rounds", type=int, default=2000)
    parser.add_argument("--drain-rounds", type=int, default=300)
    parser.add_argument(
        "--warmup",
        type=int,
        default=150,
        help="rounds before steady state (overhead is measured after)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--outputs",
        type=Path,
        help="keep the model outputs in this file and reuse them (they take ~1 min to compute)",
    )
    args = parser.parse_args(argv)
    chat = args.workload == "chat"
    for name, embeddings, chats in (
        ("corpus", 1000, 36),
        # A chat car asks for units of its engine's slots (32, ``DEFAULT_SLOTS``).
        ("unit", 32, 32),
        ("batch_requests", 8000, 2400),
    ):
        if getattr(args, name) is None:
            setattr(args, name, chats if chat else embeddings)
    started = time.perf_counter()
    if args.workload == "chat":
        with tempfile.TemporaryDirectory() as cache:
            result = run(args, chat_fleet(args, ChatModel(Path(cache), args.threads)))
    else:
        if args.outputs and args.outputs.exists():
            out = pickle.loads(args.outputs.read_bytes())
        else:
            with tempfile.TemporaryDirectory() as cache:
                out = compute_outputs(args.corpus, Path(cache), args.threads)
            if args.outputs:
                args.outputs.write_bytes(pickle.dumps(out))
        started = time.perf_counter()
        result = run(args, embeddings_fleet(args, out))
    result["run_seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = {
        "detection_rate": ">= 0.99",
        "units_to_quarantine_p99": f"<= {args.within}",
        "wrong_in_output_rate": "<= 0.01 (strict: 0)",
        "honest_quarantined": "0",
        "overhead": "<= 0.05",
    }
    summary = {k: v for k, v in result.items() if k not in ("per_kind", "counters")}
    print(json.dumps(summary, indent=2))
    for kind, figures in result["per_kind"].items():
        caught = figures["units_to_quarantine"]
        print(
            f"  {kind:16s} cars {figures['cars']:3d} cheated {figures['cheated']:3d} "
            f"caught<= {args.within}: {figures['caught_within']:3d}  units {caught}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
