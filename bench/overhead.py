"""What the fleet costs: one batch through the embedded fleet against the best local baseline.

The same N deterministic English sentences are embedded three ways on this machine:

(a) the embedded fleet (nats-server, a coordinator process, 2 agent processes with 1 ONNX
    thread each), driven as a customer would: one batch through the official ``openai`` SDK;
(b) one process, ``Embedder.load(threads=2).embed(texts)``;
(c) a ``multiprocessing`` pool of 2 processes with one single-threaded ``Embedder`` each, the
    texts cut into chunks (several chunk sizes are tried and the best counts).

The fleet runs exactly the production code path, so ``(a) / max(b, c)`` is the share of the
machine's embedding throughput that reaches the customer. (b) and (c) run before and after (a)
in alternating order on every repeat, and the best of each is kept, so machine noise hits all
three alike. The fleet's own timeline (from the polls) and the CPU seconds each fleet process
spent are printed as well, to show where (a) loses time.

Usage: ``python bench/overhead.py [--n 5000] [--repeats 2] [--json out.json] [--keep]``; the
diagnostic flags (``--texts``, ``--order``, ``--py-spy``) are described in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from openai import OpenAI

from idlefleet.agent.runtime import Embedder, load_tokenizer
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.models import minilm
from idlefleet.models.catalog import MINILM

TARGET_RATIO = 0.90
POLL_INTERVAL_S = 0.1
TERMINAL = ("completed", "failed", "cancelled", "expired")

# -- inputs ------------------------------------------------------------------------------------
_SUBJECTS = [
    "The parked car",
    "A delivery van",
    "My neighbour's electric hatchback",
    "The night shift at the depot",
    "A taxi fleet in Porto",
    "The public charging station on Elm Street",
    "An old diesel sedan",
    "The city bus depot",
    "A rooftop garage full of rental cars",
    "The owner",
    "Our support team",
    "The coordinator",
    "A research group in Helsinki",
    "The insurance company",
    "Every vehicle in the car park",
]
_VERBS = [
    "computes",
    "waits for",
    "earns money from",
    "stops",
    "resumes",
    "measures",
    "schedules",
    "forgets about",
    "downloads",
    "verifies",
    "summarises",
    "translates",
    "complains about",
    "rebuilds",
    "ignores",
]
_OBJECTS = [
    "sentence embeddings overnight",
    "a batch of customer reviews",
    "the battery floor",
    "its share of the grid",
    "a lease from the coordinator",
    "thermal limits in summer",
    "weather reports for Lisbon",
    "invoices in three languages",
    "a model signed by sha256",
    "the next unit of work",
    "the quarterly sales figures",
    "a long list of product descriptions",
    "legal contracts written in plain English",
    "the firmware update",
    "medical abstracts about sleep",
]
_CLAUSES = [
    "before the driver returns",
    "while it is plugged in",
    "at 2 a.m.",
    "without draining the battery",
    "and nobody notices",
    "again",
    "because electricity is cheap after midnight",
    "although the garage is cold and the cellular signal keeps dropping",
    "so that the morning commute is not affected in any way",
    "unless the owner has asked for a full charge by seven",
    "which saves the company a surprising amount of money every month",
    "as long as the cabin temperature stays within the configured limits",
]
_OPENERS = [
    "",
    "",
    "",
    "Apparently, ",
    "Every night, ",
    "According to the logs, ",
    "In the long run, ",
    "Surprisingly, ",
]


def bench_texts(n: int, seed: int = 20240601) -> list[str]:
    """``n`` deterministic English sentences, from a few words to a few dozen.

    Richer than ``idlefleet.cli.demo.demo_texts`` (whose sentences are all 6-15 words): zero to
    three subordinate clauses and an occasional second sentence give the spread of lengths that
    real batches have, which is what decides how much padding the micro-batches carry.
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        opener = rng.choice(_OPENERS)
        subject = rng.choice(_SUBJECTS)
        if opener:
            subject = subject[0].lower() + subject[1:]
        sentence = f"{opener}{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        clauses = rng.sample(_CLAUSES, k=rng.choices([0, 1, 2, 3], weights=[3, 4, 2, 1])[0])
        sentence += "".join(f", {c}" for c in clauses) + "."
        if rng.random() < 0.2:
            second = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            sentence += f" Then {second[0].lower()}{second[1:]}."
        texts.append(sentence)
    return texts


def batch_input(texts: Sequence[str]) -> bytes:
    """The batch input file: one request per text, ``encoding_format`` float (the default)."""
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MINILM.id, "input": text, "encoding_format": "float"},
            }
        )
        for i, text in enumerate(texts)
    ]
    return ("\n".join(lines) + "\n").encode()


# -- (a) the fleet -----------------------------------------------------------------------------
@dataclass
class FleetRun:
    """One batch through the fleet."""

    seconds: float  # batches.create -> completed status seen
    seconds_with_download: float  # ... + files.content + JSON parse of every line
    status_seconds: dict[str, float]  # first time each status was seen, from before create
    first_result_s: float | None  # first time completed > 0 was seen
    all_results_s: float | None  # first time completed == n was seen (before finalisation)
    polls: int
    cpu_seconds: dict[str, float]  # CPU time per fleet process during the run
    by_vehicle: dict[str, int]
    vectors: np.ndarray = field(repr=False)

    def rate(self, n: int) -> float:
        return n / self.seconds

    def rate_with_download(self, n: int) -> float:
        return n / self.seconds_with_download


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads), from /proc."""
    fields = _proc_stat(pid)
    if fields is None:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds() -> float:
    """CPU time of this process and every live descendant (pool workers, fleet processes)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _proc_stat(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def _machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / tick, sum(values[:8]) / tick


class NoiseMeter:
    """CPU that processes outside this benchmark used while a measurement ran.

    The machine is shared; a figure taken while someone else's test suite ran is not comparable
    with one taken on a quiet machine, so every measurement reports this alongside.
    """

    def __enter__(self) -> NoiseMeter:
        self._busy, self._total = _machine_cpu_seconds()
        self._ours = _tree_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = _machine_cpu_seconds()
        ours = _tree_cpu_seconds() - self._ours
        self.foreign_cpu_s = max(0.0, (busy - self._busy) - ours)
        self.foreign_share = self.foreign_cpu_s / max(1e-9, total - self._total)

    def __str__(self) -> str:
        return f"others used {self.foreign_cpu_s:.1f} cpu-s = {100 * self.foreign_share:.0f}%"


def wait_until_quiet(max_wait_s: float, busy_below: float = 0.15) -> str:
    """Wait (up to ``max_wait_s``) for a second in which the machine is mostly idle."""
    started = time.monotonic()
    share = 1.0
    while True:
        busy0, total0 = _machine_cpu_seconds()
        time.sleep(1.0)
        busy1, total1 = _machine_cpu_seconds()
        share = (busy1 - busy0) / max(1e-9, total1 - total0)
        waited = time.monotonic() - started
        if share < busy_below or waited >= max_wait_s:
            return f"waited {waited:.0f} s for quiet, machine {100 * share:.0f}% busy"


def _fleet_pids(fleet: EmbeddedFleet) -> dict[str, int]:
    pids = {f"agent {vid}": p.pid for vid, p in fleet.agents.items()}
    if fleet.coordinator is not None:
        pids["coordinator"] = fleet.coordinator.pid
    if fleet.nats is not None:
        pids["nats-server"] = fleet.nats.process.pid
    return pids


def run_fleet_batch(fleet: EmbeddedFleet, client: OpenAI, data: bytes, n: int) -> FleetRun:
    """Submit one batch, poll until it ends, download and parse the output."""
    uploaded = client.files.create(
        file=("overhead.jsonl", io.BytesIO(data), "application/jsonl"), purpose="batch"
    )
    pids = _fleet_pids(fleet)
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    cpu_before["bench client"] = time.process_time()
    status_seen: dict[str, float] = {}
    first_result = all_results = None
    polls = 0

    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    while True:
        now = time.perf_counter() - started
        status_seen.setdefault(batch.status, now)
        done = batch.request_counts.completed if batch.request_counts else 0
        if first_result is None and done > 0:
            first_result = now
        if all_results is None and done >= n:
            all_results = now
        if batch.status in TERMINAL:
            break
        time.sleep(POLL_INTERVAL_S)
        batch = client.batches.retrieve(batch.id)
        polls += 1
    seconds = time.perf_counter() - started
    cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    cpu["bench client"] = time.process_time() - cpu_before["bench client"]
    if batch.status != "completed" or batch.output_file_id is None:
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.errors}")

    content = client.files.content(batch.output_file_id).content
    vectors = parse_output(content, n)
    seconds_with_download = time.perf_counter() - started

    usage = fleet.get(f"/fleet/batches/{batch.id}/vehicles") or {}
    return FleetRun(
        seconds=seconds,
        seconds_with_download=seconds_with_download,
        status_seconds=status_seen,
        first_result_s=first_result,
        all_results_s=all_results,
        polls=polls,
        cpu_seconds=cpu,
        by_vehicle=dict(usage.get("completed_by_vehicle", {})),
        vectors=vectors,
    )


def parse_output(content: bytes, n: int) -> np.ndarray:
    """Vectors of the output file in input order; checks lines, ids, shapes and norms."""
    lines = content.splitlines()
    if len(lines) != n:
        raise AssertionError(f"output has {len(lines)} lines, expected {n}")
    vectors = np.full((n, MINILM.dim), np.nan, dtype=np.float32)
    seen = set()
    for line in lines:
        record = json.loads(line)
        custom_id = record["custom_id"]
        if custom_id in seen:
            raise AssertionError(f"custom_id {custom_id} appears twice in the output")
        seen.add(custom_id)
        response = record["response"]
        if record.get("error") is not None or response["status_code"] != 200:
            raise AssertionError(f"{custom_id} failed: {record}")
        (item,) = response["body"]["data"]
        vectors[int(custom_id.removeprefix("req-"))] = item["embedding"]
    if seen != {f"req-{i}" for i in range(n)}:
        raise AssertionError("output custom_ids are not exactly req-0 .. req-{n-1}")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise AssertionError(f"vectors are not unit-norm (norms {norms.min()}..{norms.max()})")
    return vectors


@contextlib.contextmanager
def profiling(fleet: EmbeddedFleet, out_dir: Path | None) -> Iterator[None]:
    """Sample every fleet process with py-spy while the block runs (no-op without out_dir)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if out_dir is None or not Path(spy).exists():
        if out_dir is not None:
            _say("      py-spy not found; not profiling (pip install py-spy into the venv)")
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    samplers = []
    for name, pid in _fleet_pids(fleet).items():
        if name == "nats-server":
            continue
        target = out_dir / (name.replace(" ", "-") + ".txt")
        command = [spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(target)]
        samplers.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    time.sleep(1.0)  # py-spy attaches asynchronously
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for sampler in samplers:
            sampler.wait(30)
        _say(f"      py-spy profiles (collapsed stacks) in {out_dir}")


def sort_by_tokens(texts: Sequence[str]) -> list[str]:
    """``texts`` ordered by token count (stable), as a length-aware unit cutter would lease."""
    tokenizer = load_tokenizer(minilm.default_model_dir())
    counts = [sum(e.attention_mask) for e in tokenizer.encode_batch(list(texts))]
    return [texts[i] for i in sorted(range(len(texts)), key=counts.__getitem__)]


# -- (b) one process, (c) a pool ---------------------------------------------------------------
def run_single(embedder: Embedder, texts: Sequence[str]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of this process's threads, vectors)."""
    cpu, started = time.process_time(), time.perf_counter()
    vectors = embedder.embed(texts).vectors
    return time.perf_counter() - started, time.process_time() - cpu, vectors


_pool_embedder: Embedder | None = None


def _pool_init(cache_root: str) -> None:
    global _pool_embedder
    _pool_embedder = Embedder.load(Path(cache_root), threads=1)
    # ORT's first run allocates and plans; the fleet's agents have long been past it.
    _pool_embedder.embed(["warm up", "the session before timing starts"])


def _pool_embed(texts: list[str]) -> np.ndarray:
    assert _pool_embedder is not None
    return _pool_embedder.embed(texts).vectors


def _chunks(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield list(texts[start : start + size])


def run_pool(pool: Any, texts: Sequence[str], chunk: int) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of the pool's workers, vectors in input order)."""
    workers = [p.pid for p in mp.active_children() if p.pid is not None]
    cpu = sum(_cpu_seconds(pid) for pid in workers)
    started = time.perf_counter()
    parts = list(pool.imap(_pool_embed, _chunks(texts, chunk)))
    vectors = np.concatenate(parts)
    seconds = time.perf_counter() - started
    return seconds, sum(_cpu_seconds(pid) for pid in workers) - cpu, vectors


def padding_stats(embedder: Embedder, texts: Sequence[str], group: int | None) -> dict[str, int]:
    """Tokens the model computes on (with padding) when texts are sorted within ``group``s.

    ``group=None`` sorts all texts at once (what (b) does); (c) sorts within its own chunks.
    """
    counts = np.asarray(embedder.count_tokens(list(texts)))
    group = group or len(counts)
    padded = 0
    for start in range(0, len(counts), group):
        ordered = np.sort(counts[start : start + group], kind="stable")
        for mb in range(0, len(ordered), embedder.micro_batch):
            rows = ordered[mb : mb + embedder.micro_batch]
            padded += int(rows.max()) * len(rows)
    return {"real_tokens": int(counts.sum()), "padded_tokens": padded}


# -- driver ------------------------------------------------------------------------------------
def _say(message: str) -> None:
    print(message, flush=True)


def _source_version() -> str:
    """The commit the measured code is at (``+dirty`` if src/ has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="inputs (default 5000)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (a), (b), (c)")
    parser.add_argument(
        "--chunks", default="64,256", help="chunk sizes tried for (c), comma-separated"
    )
    parser.add_argument(
        "--texts",
        choices=["varied", "demo"],
        default="varied",
        help="varied: 8-50 words (default); demo: idlefleet.cli.demo.demo_texts, 6-15 words",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each measurement wait up to this many seconds for an idle machine",
    )
    parser.add_argument(
        "--order",
        choices=["input", "length"],
        default="input",
        help="length: submit the inputs sorted by token count (diagnostic: shows what the "
        "fleet would do if units were cut by length, with padding out of the picture)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the coordinator and agents with py-spy (if installed) during the first "
        "fleet batch; collapsed stacks are written to DIR",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, db)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be positive")
    chunk_sizes = [int(c) for c in args.chunks.split(",") if c.strip()]

    if args.texts == "demo":
        from idlefleet.cli.demo import demo_texts

        texts = demo_texts(args.n)
    else:
        texts = bench_texts(args.n)
    if args.order == "length":
        texts = sort_by_tokens(texts)
    data = batch_input(texts)
    n = len(texts)
    words = [len(t.split()) for t in texts]
    _say(
        f"inputs: {n} {args.texts} sentences in {args.order} order, "
        f"{min(words)}-{max(words)} words "
        f"(mean {np.mean(words):.1f}), batch file {len(data) / 1e6:.2f} MB; "
        f"code {_source_version()}, python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, load {_loadavg()}"
    )

    data_dir = Path(tempfile.mkdtemp(prefix="idlefleet-overhead-"))
    fleet = EmbeddedFleet(FleetOptions(data_dir=data_dir, agents=2, threads=1))
    pool = None
    results: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
    fleet_runs: list[FleetRun] = []
    try:
        started = time.perf_counter()
        fleet.start()
        _say(
            f"fleet up in {time.perf_counter() - started:.1f} s: {fleet.base_url}, "
            f"vehicles {', '.join(fleet.online_vehicles())}; data dir {data_dir}"
        )
        cache_root = data_dir / "models"
        client = OpenAI(base_url=fleet.base_url + "/v1", api_key=fleet.api_key, max_retries=0)

        embedder = Embedder.load(cache_root, threads=2)
        embedder.embed(["warm up", "the session before timing starts"])
        # spawn, not fork: this process already runs ORT and HTTP threads.
        pool = mp.get_context("spawn").Pool(2, initializer=_pool_init, initargs=(str(cache_root),))
        pool.map(_pool_embed, [["warm"], ["up"]], chunksize=1)  # both loaded before timing
        reference: np.ndarray | None = None

        def measure_b() -> None:
            nonlocal reference
            _say(f"  {wait_until_quiet(args.quiet_wait)}")
            with NoiseMeter() as noise:
                seconds, cpu, vectors = run_single(embedder, texts)
            reference = vectors if reference is None else reference
            results["b"].append(
                {
                    "rate": n / seconds,
                    "seconds": seconds,
                    "cpu_s": cpu,
                    "foreign_share": noise.foreign_share,
                }
            )
            _say(
                f"  (b) 1 proc 2 thr     {n / seconds:7.1f} inputs/s  ({seconds:.2f} s, "
                f"{cpu:.1f} cpu-s; {noise})"
            )

        def measure_c() -> None:
            for chunk in chunk_sizes:
                _say(f"  {wait_until_quiet(args.quiet_wait)}")
                with NoiseMeter() as noise:
                    seconds, cpu, vectors = run_pool(pool, texts, chunk)
                if reference is not None:
                    np.testing.assert_allclose(vectors, reference, atol=1e-4)
                results["c"].append(
                    {
                        "rate": n / seconds,
                        "seconds": seconds,
                        "chunk": chunk,
                        "cpu_s": cpu,
                        "foreign_share": noise.foreign_share,
                    }
                )
                _say(
                    f"  (c) pool 2x1 thr     {n / seconds:7.1f} inputs/s  ({seconds:.2f} s, "
                    f"{cpu:.1f} cpu-s, chunks of {chunk}; {noise})"
                )

        def measure_a() -> None:
            _say(f"  {wait_until_quiet(args.quiet_wait)}")
            profile = args.py_spy if args.py_spy and not fleet_runs else None
            with NoiseMeter() as noise, profiling(fleet, profile):
                run = run_fleet_batch(fleet, client, data, n)
            fleet_runs.append(run)
            results["a"].append(
                {
                    "rate": run.rate(n),
                    "seconds": run.seconds,
                    "rate_incl_download": run.rate_with_download(n),
                    "seconds_incl_download": run.seconds_with_download,
                    "cpu_s": sum(v for k, v in run.cpu_seconds.items() if k.startswith("agent")),
                    "foreign_share": noise.foreign_share,
                }
            )
            _say(
                f"  (a) fleet            {run.rate(n):7.1f} inputs/s  ({run.seconds:.2f} s "
                f"create -> completed; {run.seconds_with_download:.2f} s incl. download = "
                f"{run.rate_with_download(n):.1f} inputs/s; {run.polls} polls; {noise})"
            )
            _say("      timeline " + _timeline(run))
            _say(
                "      cpu s    "
                + ", ".join(f"{k} {v:.2f}" for k, v in run.cpu_seconds.items())
                + f"  (of {2 * run.seconds:.2f} available)"
            )
            _say(f"      by car   {run.by_vehicle}")

        for r in range(args.repeats):
            _say(f"round {r + 1}/{args.repeats} (load {_loadavg()})")
            # Alternate the order so that neither side always runs first (cold caches) or last.
            order: list[Callable[[], None]] = [measure_b, measure_c, measure_a]
            for step in order if r % 2 == 0 else order[::-1]:
                step()

        assert reference is not None
        min_cos = float(min(np.sum(run.vectors * reference, axis=1).min() for run in fleet_runs))
        if min_cos < 0.9999:
            raise AssertionError(f"fleet vectors disagree with (b): min cosine {min_cos:.6f}")
        padding = {
            "b (sorted globally)": padding_stats(embedder, texts, None),
        }
        for chunk in chunk_sizes:
            padding[f"c (per {chunk})"] = padding_stats(embedder, texts, chunk)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        fleet.stop()

    best_a = max(results["a"], key=lambda m: m["rate"])
    best_a_dl = max(m["rate_incl_download"] for m in results["a"])
    best_b = max(results["b"], key=lambda m: m["rate"])
    best_c = max(results["c"], key=lambda m: m["rate"])
    baseline = max(best_b["rate"], best_c["rate"])
    ratio = best_a["rate"] / baseline
    _say("")
    _say(f"checks: {n} output lines, distinct custom_ids, unit-norm {MINILM.dim}-d vectors;")
    _say(f"        min cosine vs (b) over {n} inputs x {len(fleet_runs)} batches {min_cos:.7f}")
    _say("padding (tokens computed / real tokens):")
    for name, stats in padding.items():
        _say(
            f"        {name:22s} {stats['padded_tokens']:8d} / {stats['real_tokens']} = "
            f"{stats['padded_tokens'] / stats['real_tokens']:.3f}"
        )
    _say(
        "cpu-s spent embedding, least per measurement (the model's work, padding included): "
        + ", ".join(
            f"{name} {min(m['cpu_s'] for m in results[key]):.1f}"
            for key, name in (("a", "(a) agents"), ("b", "(b)"), ("c", "(c) workers"))
        )
    )
    _say(_log_summary(data_dir / "logs"))
    _say("")
    _say(f"inputs            {n}")
    _say(
        f"(a) fleet         {best_a['rate']:.0f} inputs/s   (create -> completed), "
        f"{best_a_dl:.0f} inputs/s incl. download"
    )
    _say(f"(b) 1 proc 2 thr  {best_b['rate']:.0f} inputs/s")
    _say(f"(c) pool 2x1 thr  {best_c['rate']:.0f} inputs/s   (chunks of {best_c['chunk']})")
    _say(f"ratio (a)/max(b,c) = {ratio:.2f}   (target >= {TARGET_RATIO:.2f})")
    noisiest = max(m["foreign_share"] for ms in results.values() for m in ms)
    if noisiest > 0.05:
        _say(
            f"note: other processes took up to {100 * noisiest:.0f}% of the machine during a "
            "measurement; see the per-measurement figures above"
        )

    if args.json:
        figures = {
            "inputs": n,
            "code": _source_version(),
            "texts": args.texts,
            "order": args.order,
            "repeats": args.repeats,
            "a_inputs_per_s": best_a["rate"],
            "a_incl_download_inputs_per_s": best_a_dl,
            "b_inputs_per_s": best_b["rate"],
            "c_inputs_per_s": best_c["rate"],
            "c_best_chunk": best_c["chunk"],
            "ratio": ratio,
            "target": TARGET_RATIO,
            "min_cosine_vs_b": min_cos,
            "measurements": results,
            "fleet_runs": [
                {k: v for k, v in vars(run).items() if k != "vectors"} for run in fleet_runs
            ],
            "padding": padding,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        _say(f"figures written to {args.json}")
    if args.keep:
        _say(f"data dir kept: {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def _timeline(run: FleetRun) -> str:
    parts = [f"{status} {t:.2f}s" for status, t in run.status_seconds.items()]
    if run.first_result_s is not None:
        parts.append(f"first result {run.first_result_s:.2f}s")
    if run.all_results_s is not None:
        parts.append(f"all results {run.all_results_s:.2f}s")
    return ", ".join(parts)


def _log_summary(log_dir: Path) -> str:
    lines = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        bad = [line for line in text if " WARNING " in line or " ERROR " in line]
        lines.append(f"        {log.name}: {len(text)} lines, {len(bad)} warnings/errors")
        lines.extend(f"          {line[:160]}" for line in bad[:3])
    return "logs:\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
