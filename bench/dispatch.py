"""How many cars one coordinator serves: heartbeats, leases and result commits per second.

Targets (issue #9), on this 2-core machine, ONE coordinator process on SQLite, while 5,000
cars idle-poll for work: at least 10,000 heartbeats/s and 1,000 leases/s with their result
commits, p99 latency under 100 ms.

Each configuration runs the real processes: a ``nats-server``, N ``idlefleet coordinator``
processes on the store, and this script as the fleet: 10,000 lightweight simulated cars (no
model) spread over a few NATS connections (subjects carry the car id, so many cars can share a
connection), speaking the NATS protocol through a lean client (``wirecars.py``: nats-py's own
request path costs as much CPU as the coordinator's answer, and they share 2 cores). In order:

1. the store gets the owners' policies (written directly, as set-up): 5,000 *idle* cars whose
   owners allow only ``research`` work, 5,000 *busy* cars whose owners allow anything;
2. all 10,000 cars register over NATS (registrations/s is printed too);
3. the 5,000 idle cars long-poll for work and keep doing so until the end: a batch of
   ``general`` work arrives later, which they may not take, so they stay parked at the
   coordinator the whole time, as idle cars do;
4. heartbeats: the busy cars send heartbeats, ``--concurrency`` in flight, for ``--seconds``;
5. leases: a batch of ``--requests`` one-line embedding requests is submitted over HTTP; the
   busy cars, ``--lease-concurrency`` at a time, each ask for a unit (``--unit`` requests), send
   its results (unit-norm 384-d vectors) and ask again, until the batch is done; the output file
   is checked: every ``custom_id`` exactly once.

Baseline, same run: a do-nothing responder process (nats-py, answers every request with a fixed
reply) is driven by the same client at the same concurrency; ``heartbeats/s ÷ echo/s`` says how
much of the wire's capacity the coordinator's work leaves. CPU seconds of each process per
phase are printed, since on 2 cores the client and nats-server take CPU from the coordinator.

Configurations (``--configs``): ``sqlite`` (one process), ``postgresql`` (one process),
``postgresql-2`` (two replicas in one queue group). PostgreSQL runs use a fresh database on
``--pg-dsn`` (default: this machine's server), dropped afterwards.

Usage: ``python bench/dispatch.py [--configs sqlite,postgresql,postgresql-2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from idlefleet.cli.demo import batch_input
from idlefleet.coordinator.access import Quotas, Role, new_api_key
from idlefleet.coordinator.store import open_store, sqlite_url
from idlefleet.embedded.nats_server import NatsServer, start_nats_server
from idlefleet.embedded.ports import free_port
from idlefleet.models.catalog import MINILM
from idlefleet.protocol import subjects
from idlefleet.protocol.messages import (
    PROTOCOL_VERSION,
    Hardware,
    Heartbeat,
    RegisterRequest,
    ResultChunk,
    WorkRequest,
)
from idlefleet.protocol.policy import OwnerPolicy
from idlefleet.protocol.subjects import Uplink
from wirecars import WireConnection

TARGETS = {"heartbeats_per_s": 10_000, "leases_per_s": 1_000, "p99_ms": 100}
CONFIGS = {
    "sqlite": ("sqlite", 1),
    "postgresql": ("postgresql", 1),
    "postgresql-2": ("postgresql", 2),
}
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _say(message: str) -> None:
    print(message, flush=True)


# -- latency bookkeeping -------------------------------------------------------------------------


@dataclass
class Timings:
    """Latencies of answered requests (seconds) and the refusals, over one phase."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    started: float = 0.0
    ended: float = 0.0

    def summary(self) -> dict[str, float]:
        seconds = max(1e-9, self.ended - self.started)
        lat = sorted(self.latencies)
        return {
            "count": len(lat),
            "errors": self.errors,
            "seconds": round(seconds, 3),
            "per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(_quantile(lat, 0.50) * 1e3, 2),
            "p99_ms": round(_quantile(lat, 0.99) * 1e3, 2),
            "max_ms": round(lat[-1] * 1e3, 2) if lat else 0.0,
        }


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


# -- processes -----------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Profiler:
    """``py-spy record`` of one process while a phase runs (``--py-spy DIR``), else nothing."""

    def __init__(self, out_dir: str | None, pid: int) -> None:
        self.out_dir, self.pid = out_dir, pid
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, name: str) -> None:
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            self._process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--threads",
                    "-o",
                    f"{self.out_dir}/{name}.txt",
                    "-p",
                    str(self.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(2)
            self._process.wait(30)
            self._process = None


def _thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread and of all its other threads together."""
    main = others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        seconds = _cpu_seconds_of(task / "stat")
        if int(task.name) == pid:
            main += seconds
        else:
            others += seconds
    return {"main": main, "threads": others}


def _cpu_seconds_of(stat: Path) -> float:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each named process used between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._at = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        self.used = {
            name: round((_cpu_seconds(pid) - self._at[name]) / wall, 2)
            for name, pid in self.pids.items()
        }
        return self.used


@dataclass
class Coordinators:
    """N ``idlefleet coordinator`` processes on one store and one NATS server."""

    processes: list[subprocess.Popen[bytes]]
    ports: list[int]
    log_dir: Path

    @classmethod
    def start(
        cls, n: int, nats_url: str, store_url: str, log_dir: Path, heartbeat_s: float
    ) -> Coordinators:
        log_dir.mkdir(parents=True, exist_ok=True)
        processes, ports = [], []
        for i in range(n):
            port = free_port()
            with open(log_dir / f"coordinator-{i}.log", "ab") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "idlefleet",
                            "coordinator",
                            "--nats-url",
                            nats_url,
                            "--store",
                            store_url,
                            "--port",
                            str(port),
                            "--heartbeat-seconds",
                            str(heartbeat_s),
                            "--lease-seconds",
                            "30",
                            "--replica",
                            f"bench-{i}",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            ports.append(port)
        running = cls(processes, ports, log_dir)
        deadline = time.monotonic() + 60
        for port, process in zip(ports, processes, strict=True):
            while not _healthy(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    running.stop()
                    raise RuntimeError(f"a coordinator did not start; see {log_dir}")
                time.sleep(0.05)
        return running

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


_KEYS: dict[Role, str] = {}
"""API keys made by `_prepare_store`: the customer's for /v1, the operator's for /fleet."""


def _key(url: str) -> dict[str, str]:
    role = Role.OPERATOR if "/fleet/" in url else Role.CUSTOMER
    return {"Authorization": f"Bearer {_KEYS[role]}"}


def _http(method: str, url: str, body: Any = None, raw: bool = False) -> Any:
    headers, data = _key(url), None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        content = response.read()
    return content if raw else json.loads(content)


def _upload(base_url: str, content: bytes) -> str:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    body.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
    )
    body.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n".encode()
    )
    body.write(content)
    body.write(f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        f"{base_url}/v1/files",
        data=body.getvalue(),
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **_key(base_url)},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["id"])


ECHO_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await msg.respond(b'{"ok":true,"policy_version":1,"error":null}')
    await nc.subscribe("bench.echo.*.heartbeat", queue="echo", cb=echo)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


# -- the simulated fleet -------------------------------------------------------------------------


class SimCars:
    """Many cars over a few NATS connections (see ``wirecars.py``); each call is timed."""

    def __init__(self, connections: list[WireConnection]) -> None:
        self.connections = connections

    @classmethod
    async def connect(cls, url: str, n: int) -> SimCars:
        return cls([await WireConnection.connect(url) for _ in range(n)])

    async def call(self, index: int, subject: str, payload: bytes, timeout: float) -> bytes:
        connection = self.connections[index % len(self.connections)]
        return await connection.request(subject, payload, timeout)

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()


def car_id(i: int) -> str:
    return f"car-{i:05d}"


async def _closed_loop(
    concurrency: int, seconds: float, warmup: float, step: Callable[[int], Awaitable[bool]]
) -> Timings:
    """``concurrency`` workers each run ``step(worker)`` again and again; time the answers."""
    timings = Timings()
    loop = asyncio.get_running_loop()
    start = loop.time()
    timings.started = time.perf_counter() + warmup
    end = start + warmup + seconds

    async def worker(w: int) -> None:
        while loop.time() < end:
            t0 = time.perf_counter()
            ok = await step(w)
            t1 = time.perf_counter()
            if t0 >= timings.started and t1 <= timings.started + seconds:
                if ok:
                    timings.latencies.append(t1 - t0)
                else:
                    timings.errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    timings.ended = timings.started + seconds
    return timings


async def register_all(cars: SimCars, n: int, concurrency: int) -> Timings:
    hardware = Hardware(accelerator="HW4", tops=100, memory_gb=16, power_w=100)
    next_car = iter(range(n))
    timings = Timings(started=time.perf_counter())

    async def worker() -> None:
        for i in next_car:
            payload = (
                RegisterRequest(
                    protocol_version=PROTOCOL_VERSION,
                    agent_version="bench",
                    hardware=hardware,
                    models=[MINILM.id],
                )
                .model_dump_json()
                .encode()
            )
            t0 = time.perf_counter()
            try:
                raw = await cars.call(i, subjects.uplink(car_id(i), Uplink.REGISTER), payload, 30)
                ok = json.loads(raw).get("accepted") is True
            except Exception:
                ok = False
            if ok:
                timings.latencies.append(time.perf_counter() - t0)
            else:
                timings.errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    timings.ended = time.perf_counter()
    return timings


@dataclass
class IdlePolls:
    answered: int = 0
    errors: int = 0
    granted: int = 0


IDLE_WAIT_S = 10.0


async def idle_poll(cars: SimCars, ids: range, stop: asyncio.Event, stats: IdlePolls) -> None:
    """Each idle car keeps one long poll outstanding until ``stop``.

    A real fleet's idle cars ask at independent moments; cars that all start together would
    come back as a herd every ``IDLE_WAIT_S`` (the coordinator's jitter spreads a herd only
    over many polls), and whether a measured phase met a herd would decide its figure. So
    each car's first poll waits a different time (spread evenly over 1 s to ``IDLE_WAIT_S``),
    and from then on the polls arrive at an even rate (5,000 cars: ~560 polls/s).
    """

    def request(wait_s: float) -> bytes:
        ask = WorkRequest(max_requests=4, models=[MINILM.id], wait_s=wait_s)
        return ask.model_dump_json().encode()

    payload = request(IDLE_WAIT_S)

    async def car(i: int) -> None:
        subject = subjects.uplink(car_id(i), Uplink.WORK)
        first = request(round(1.0 + (IDLE_WAIT_S - 1.0) * (i - ids.start) / max(1, len(ids)), 3))
        while not stop.is_set():
            try:
                raw = await cars.call(i, subject, first or payload, 20)
                first = b""
            except Exception:
                stats.errors += 1
                await asyncio.sleep(1)
                continue
            stats.answered += 1
            grant = json.loads(raw)
            if grant.get("lease_id"):
                stats.granted += 1  # must not happen: their owners allow no general work
            if grant.get("error"):
                stats.errors += 1
                await asyncio.sleep(1)

    await asyncio.gather(*(car(i) for i in ids))


async def heartbeats(
    cars: SimCars, ids: range, concurrency: int, seconds: float, prefix: str = ""
) -> Timings:
    payload = Heartbeat(seq=1, status="idle").model_dump_json().encode()
    counter = iter(range(10**12))

    async def step(_w: int) -> bool:
        i = ids[next(counter) % len(ids)]
        subject = (
            f"{prefix}.{car_id(i)}.heartbeat"
            if prefix
            else subjects.uplink(car_id(i), Uplink.HEARTBEAT)
        )
        try:
            raw = await cars.call(i, subject, payload, 10)
        except Exception:
            return False
        return b'"ok":true' in raw

    return await _closed_loop(concurrency, seconds, 1.0, step)


def _vector_of(text: str) -> bytes:
    """A unit-length float32 vector that depends on the text alone: every car answers a text
    the same (verification re-runs some requests on other cars and compares)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(MINILM.dim).astype("<f4")
    return (v / np.linalg.norm(v)).astype("<f4").tobytes()


class _Vectors:
    """Each text's vector, made once (the cars' CPU is the coordinator's on these 2 cores)."""

    def __init__(self) -> None:
        self._known: dict[str, bytes] = {}

    def b64(self, items: list[dict[str, Any]]) -> str:
        parts = []
        for item in items:
            for text in item["payload"]:
                found = self._known.get(text)
                if found is None:
                    found = self._known[text] = _vector_of(text)
                parts.append(found)
        return base64.b64encode(b"".join(parts)).decode()


@dataclass
class LeaseRun:
    leases: Timings
    commits: Timings
    committed: int = 0
    empty_polls: int = 0
    lease_times: list[tuple[float, float]] = field(default_factory=list)
    """(seconds into the phase, latency) of every lease, to see when the slow ones came."""


async def lease_and_commit(
    cars: SimCars,
    ids: range,
    concurrency: int,
    unit: int,
    total: int,
    deadline_s: float,
    on_done: Callable[[], None] = lambda: None,
) -> LeaseRun:
    """Busy cars lease units and commit results until ``total`` requests are committed.

    The phase ends, and ``on_done()`` is called (to stop the CPU meters), when the last
    result is committed, not when every car has stopped: after the batch runs dry the cars
    still asking wait out a long poll (up to ``wait_s``) that measures nothing.
    """
    vectors = _Vectors()
    ask = WorkRequest(max_requests=unit, models=[MINILM.id], wait_s=1).model_dump_json().encode()
    run = LeaseRun(Timings(), Timings())
    run.leases.started = run.commits.started = time.perf_counter()
    stop_at = time.perf_counter() + deadline_s
    done = asyncio.Event()

    def finish() -> None:
        if not done.is_set():
            run.leases.ended = run.commits.ended = time.perf_counter()
            done.set()
            on_done()

    async def worker(w: int) -> None:
        i = ids[w % len(ids)]
        vid = car_id(i)
        work_subject = subjects.uplink(vid, Uplink.WORK)
        results_subject = subjects.uplink(vid, Uplink.RESULTS)
        while not done.is_set() and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                grant = json.loads(await cars.call(i, work_subject, ask, 10))
            except Exception:
                run.leases.errors += 1
                continue
            if grant.get("error"):
                run.leases.errors += 1
                continue
            if not grant.get("lease_id"):
                run.empty_polls += 1
                continue
            run.leases.latencies.append(time.perf_counter() - t0)
            run.lease_times.append((t0 - run.leases.started, time.perf_counter() - t0))
            items = grant["items"]
            chunk = ResultChunk(
                lease_id=grant["lease_id"],
                seqs=[item["seq"] for item in items],
                token_counts=[4] * len(items),
                sizes=[4 * MINILM.dim * len(item["payload"]) for item in items],
                data_b64=vectors.b64(items),
            )
            t1 = time.perf_counter()
            try:
                ack = json.loads(
                    await cars.call(i, results_subject, chunk.model_dump_json().encode(), 10)
                )
            except Exception:
                run.commits.errors += 1
                continue
            if ack.get("error"):
                run.commits.errors += 1
                continue
            run.commits.latencies.append(time.perf_counter() - t1)
            run.committed += ack["committed"]
            if run.committed >= total:
                finish()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finish()  # the deadline passed first
    return run


# -- one configuration ---------------------------------------------------------------------------


def _prepare_store(store_url: str, n_cars: int, idle: int) -> None:
    """Owners' policies, as set-up: the first ``idle`` cars allow only research work."""
    store = open_store(store_url)
    try:
        anything = OwnerPolicy(opted_in=True, charging_only=False).model_dump_json()
        research = OwnerPolicy(
            opted_in=True, charging_only=False, purposes=["research"]
        ).model_dump_json()
        now = time.time()
        for i in range(n_cars):
            store.append_policy(car_id(i), research if i < idle else anything, "bench", now)
        for role, principal in ((Role.CUSTOMER, "bench"), (Role.OPERATOR, "bench-operator")):
            # No quotas: the bench measures the edge, not a customer's limits.
            secret, record = new_api_key(role, principal, quotas=Quotas())
            store.put_api_key(record)
            _KEYS[role] = secret
    finally:
        store.close()


async def run_config(
    name: str, args: argparse.Namespace, nats_url: str, work_dir: Path, echo_per_s: float
) -> dict[str, Any]:
    backend, replicas = CONFIGS[name]
    database = None
    if backend == "sqlite":
        store_url = sqlite_url((work_dir / f"{name}.db").resolve())
    else:
        from idlefleet.embedded.postgres import create_database

        database = f"idlefleet_bench_{uuid.uuid4().hex[:12]}"
        create_database(args.pg_dsn, database)
        store_url = urlunsplit(urlsplit(args.pg_dsn)._replace(path=f"/{database}"))
    result: dict[str, Any] = {"config": name, "backend": backend, "replicas": replicas}
    coordinators: Coordinators | None = None
    try:
        _say(f"\n== {name}: {replicas} coordinator(s) on {backend}")
        t0 = time.perf_counter()
        _prepare_store(store_url, args.cars, args.idle)
        _say(f"   policies for {args.cars:,} cars written in {time.perf_counter() - t0:.1f} s")
        coordinators = Coordinators.start(
            replicas, nats_url, store_url, work_dir / f"logs-{name}", args.heartbeat_seconds
        )
        pids = {f"coordinator-{i}": p.pid for i, p in enumerate(coordinators.processes)}
        pids |= {"nats-server": args.nats_pid, "bench-client": os.getpid()}
        meter = CpuMeter(pids)
        cars = await SimCars.connect(nats_url, args.connections)
        try:
            reg = await register_all(cars, args.cars, 256)
            result["registrations"] = reg.summary()
            _say(f"   registered {reg.summary()['count']:,} cars: {_fmt(reg.summary())}")

            stop_idle = asyncio.Event()
            idle_stats = IdlePolls()
            idle_task = asyncio.create_task(
                idle_poll(cars, range(args.idle), stop_idle, idle_stats)
            )
            await asyncio.sleep(2.0)  # every idle car has its poll parked
            parked = _parked(coordinators)
            _say(f"   idle cars polling: {parked:,} work requests parked at the coordinator(s)")
            result["parked_work_requests"] = parked

            busy = range(args.idle, args.cars)
            profiler = Profiler(args.py_spy, coordinators.processes[0].pid)
            gc.collect()  # between phases, not during one
            meter.start()
            profiler.start(f"{name}-heartbeats")
            beats = await heartbeats(cars, busy, args.concurrency, args.seconds)
            profiler.stop()
            result["heartbeats"] = beats.summary() | {"cpu": meter.stop()}
            _say(f"   heartbeats: {_fmt(beats.summary())}  cpu/s {meter.used}")
            if echo_per_s:
                result["heartbeats"]["of_echo"] = round(beats.summary()["per_s"] / echo_per_s, 3)

            content = batch_input([f"bench sentence number {i}" for i in range(args.requests)])
            file_id = _upload(coordinators.url(), content)
            batch = _http(
                "POST",
                f"{coordinators.url()}/v1/batches",
                {
                    "input_file_id": file_id,
                    "endpoint": "/v1/embeddings",
                    "completion_window": "24h",
                },
            )
            while (
                _http("GET", f"{coordinators.url()}/v1/batches/{batch['id']}")["status"]
                == "validating"
            ):
                await asyncio.sleep(0.05)
            coordinator_pid = coordinators.processes[0].pid
            threads_before = _thread_cpu_seconds(coordinator_pid)
            gc.collect()  # between phases, not during one
            meter.start()
            profiler.start(f"{name}-leases")
            measured: dict[str, Any] = {}

            def phase_done() -> None:
                profiler.stop()
                measured["cpu"] = meter.stop()
                measured["threads"] = _thread_cpu_seconds(coordinator_pid)

            run = await lease_and_commit(
                cars,
                busy,
                args.lease_concurrency,
                args.unit,
                args.requests,
                args.lease_deadline,
                phase_done,
            )
            cpu, threads_after = measured["cpu"], measured["threads"]
            result["leases_coordinator_cpu_s"] = {
                k: round(threads_after[k] - threads_before[k], 2) for k in threads_after
            }
            _say(f"   coordinator 0 cpu-s in the lease phase: {result['leases_coordinator_cpu_s']}")
            result["leases"] = run.leases.summary() | {"cpu": cpu}
            result["commits"] = run.commits.summary() | {"committed_requests": run.committed}
            rate = max(1e-9, run.leases.summary()["per_s"])
            per_lease = {name: round(used / rate * 1e3, 3) for name, used in cpu.items()}
            result["leases"]["cpu_ms_per_lease"] = per_lease
            _say(f"   leases:  {_fmt(run.leases.summary())}  cpu/s {cpu}")
            _say(f"   cpu ms per lease and its commit: {per_lease}")
            _say(f"   commits: {_fmt(run.commits.summary())}  ({run.committed:,} requests)")
            worst = sorted(sorted(run.lease_times, key=lambda x: -x[1])[:5])
            _say(
                "   slowest leases (s into the phase: ms): "
                + ", ".join(f"{at:.1f}: {took * 1e3:.0f}" for at, took in worst)
                + f" (phase {run.leases.summary()['seconds']:.1f} s)"
            )
            stop_idle.set()
            final = await _wait_for_batch(coordinators.url(), batch["id"], 120)
            result["batch"] = _check_output(coordinators.url(), final, args.requests)
            _say(f"   batch {final['status']}: {result['batch']}")
            idle_task.cancel()
            await asyncio.gather(idle_task, return_exceptions=True)
            result["idle_polls"] = vars(idle_stats)
            _say(
                f"   idle polls answered {idle_stats.answered:,}, errors {idle_stats.errors}, "
                f"wrongly granted {idle_stats.granted}"
            )
            result["dispatch"] = [
                _http("GET", f"{coordinators.url(i)}/fleet/dispatch") for i in range(replicas)
            ]
        finally:
            await cars.close()
    finally:
        if coordinators is not None:
            coordinators.stop()
        if database is not None:
            from idlefleet.embedded.postgres import drop_database

            drop_database(args.pg_dsn, database)
    return result


def _parked(coordinators: Coordinators) -> int:
    return sum(
        int(_http("GET", f"{coordinators.url(i)}/fleet/dispatch")["parked_work_requests"])
        for i in range(len(coordinators.ports))
    )


async def _wait_for_batch(base_url: str, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = _http("GET", f"{base_url}/v1/batches/{batch_id}")
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return dict(batch)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} did not finish")


def _check_output(base_url: str, batch: dict[str, Any], n: int) -> dict[str, Any]:
    url = f"{base_url}/v1/files/{batch['output_file_id']}/content"
    lines = _http("GET", url, raw=True).splitlines()
    ids = [json.loads(line)["custom_id"] for line in lines]
    exactly_once = len(ids) == n and set(ids) == {f"req-{i}" for i in range(n)}
    return {"status": batch["status"], "lines": len(ids), "every_custom_id_once": exactly_once}


def _fmt(s: dict[str, Any]) -> str:
    return (
        f"{s['per_s']:>9,.0f}/s  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  "
        f"max {s['max_ms']:.0f} ms  errors {s['errors']}"
    )


async def echo_baseline(args: argparse.Namespace, nats_url: str) -> dict[str, Any]:
    """The same client against a responder that does nothing: the wire's own ceiling."""
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_RESPONDER, nats_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()
        cars = await SimCars.connect(nats_url, args.connections)
        meter = CpuMeter(
            {"echo": process.pid, "bench-client": os.getpid(), "nats-server": args.nats_pid}
        )
        gc.collect()  # between phases, not during one
        meter.start()
        try:
            timings = await heartbeats(
                cars, range(args.cars), args.concurrency, args.seconds, prefix="bench.echo"
            )
        finally:
            await cars.close()
        summary = timings.summary() | {"cpu": meter.stop()}
        _say("\n== baseline: do-nothing responder")
        _say(f"   echo:       {_fmt(summary)}  cpu/s {meter.used}")
        return summary
    finally:
        process.terminate()
        process.wait(10)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # This process is the fleet and the stopwatch: a full collection of its own garbage
    # (~100 ms with 10,000 cars' state) would show up as every in-flight request being slow
    # at once. Its cycles are few; collect them between phases instead.
    gc.disable()
    with tempfile.TemporaryDirectory(prefix="idlefleet-dispatch-") as tmp:
        work_dir = Path(args.keep) if args.keep else Path(tmp)
        server: NatsServer = start_nats_server(work_dir / "nats")
        args.nats_pid = server.process.pid
        try:
            report: dict[str, Any] = {"configs": {}}
            echo = await echo_baseline(args, server.url)
            report["echo"] = echo
            for name in args.configs:
                report["configs"][name] = await run_config(
                    name, args, server.url, work_dir, echo["per_s"]
                )
        finally:
            server.stop()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="sqlite,postgresql,postgresql-2")
    parser.add_argument("--cars", type=int, default=10_000)
    parser.add_argument("--idle", type=int, default=5_000, help="cars that idle-poll throughout")
    parser.add_argument("--connections", type=int, default=4, help="NATS connections of the fleet")
    parser.add_argument("--concurrency", type=int, default=256, help="heartbeats in flight")
    parser.add_argument("--seconds", type=float, default=10.0, help="heartbeat phase length")
    parser.add_argument("--requests", type=int, default=20_000, help="requests in the batch")
    parser.add_argument("--unit", type=int, default=4, help="requests per unit")
    parser.add_argument(
        "--lease-concurrency",
        type=int,
        default=128,
        help="busy cars leasing at once (enough to keep the coordinator busy; see bench/README)",
    )
    parser.add_argument("--lease-deadline", type=float, default=120.0)
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--pg-dsn", default=os.environ.get("IDLEFLEET_TEST_PG_DSN", DEFAULT_PG_DSN))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--py-spy", metavar="DIR", help="profile coordinator 0 in each phase")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (logs, stores)")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if not 0 < args.idle < args.cars:
        parser.error("--idle must be between 0 and --cars")
    report = asyncio.run(main_async(args))
    headline = report["configs"].get("sqlite")
    if headline:
        report |= {
            "heartbeats_per_s": headline["heartbeats"]["per_s"],
            "heartbeat_p99_ms": headline["heartbeats"]["p99_ms"],
            "leases_per_s": headline["leases"]["per_s"],
            "lease_p99_ms": headline["leases"]["p99_ms"],
            "commits_per_s": headline["commits"]["per_s"],
            "commit_p99_ms": headline["commits"]["p99_ms"],
        }
        _say(
            f"\nsqlite, one process, {args.idle:,} cars idle-polling: "
            f"{report['heartbeats_per_s']:,.0f} heartbeats/s "
            f"(p99 {report['heartbeat_p99_ms']} ms), "
            f"{report['leases_per_s']:,.0f} leases/s (p99 {report['lease_p99_ms']} ms), "
            f"{report['commits_per_s']:,.0f} commits/s (p99 {report['commit_p99_ms']} ms); "
            f"targets ≥ {TARGETS['heartbeats_per_s']:,}/s, ≥ {TARGETS['leases_per_s']:,}/s, "
            f"p99 < {TARGETS['p99_ms']} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
