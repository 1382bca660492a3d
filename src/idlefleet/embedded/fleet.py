"""An embedded fleet: nats-server(s), coordinator replica(s) and N agent processes, supervised.

Used by ``idlefleet up``, the integration tests and the benchmarks, so all three run exactly the
production code path: separate processes talking over a real NATS server.

Two shapes. The default is one nats-server, one coordinator on SQLite in the data directory.
The scaled-out shape (``store_url`` of a PostgreSQL database, ``replicas`` > 1, ``nats_nodes``
3) runs a routed nats-server cluster with clustered JetStream, and coordinator replicas in one
queue group on the shared store, each with its own HTTP port; every agent and replica gets the
whole seed list and fails over between the nodes. :meth:`EmbeddedFleet.kill_coordinator` and
:meth:`EmbeddedFleet.kill_nats_node` are there for fault drills.

Security is on, as in production (`idlefleet.embedded.credentials`): the fleet makes an
operator, an owner (``embedded-fleet``) and a customer API key in the store before the
coordinators start (``keys.json`` in the data directory, mode 0600, reused on a restart), each
car makes its own nkey and the fleet enrols it through the operator API, and nats-server
accepts only the coordinators' key and enrolled cars, each confined to its own subjects.

Each agent reads its car from a replayed state trace, and the fleet sets each car's owner policy
through the owner API as its owner would, so the consent record shows who switched the embedded
cars on. Two kinds of fleet:

* ``parked`` (default): every car stays parked and charging, opted in with the default policy;
* ``sim``: every car is a car of the fleet model (`idlefleet.sim.trace`), time-compressed: it
  drives off and comes back, plugs in or not, and has its model owner's policy (hours, floor,
  energy cap) and hardware class, so churn follows the model instead of a script.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from idlefleet.coordinator.store.factory import sqlite_url
from idlefleet.embedded.credentials import OWNER, FleetSecrets, prepare_security
from idlefleet.embedded.nats_cluster import NatsCluster, start_nats_cluster
from idlefleet.embedded.nats_server import NatsServer, start_nats_server
from idlefleet.embedded.ports import free_ports
from idlefleet.embedded.tls import TlsFiles, client_context
from idlefleet.protocol.identity import public_nkey
from idlefleet.protocol.seeds import nats_servers

PARKING = (
    (48.14, 11.58),  # Munich
    (52.52, 13.40),  # Berlin
    (48.86, 2.35),  # Paris
    (52.37, 4.90),  # Amsterdam
    (45.46, 9.19),  # Milan
    (48.21, 16.37),  # Vienna
    (40.42, -3.70),  # Madrid
    (59.33, 18.07),  # Stockholm
)
"""Where the embedded fleet's cars park (latitude, longitude), each by its id."""


@dataclass
class FleetOptions:
    data_dir: Path
    agents: int = 2
    threads: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    max_unit: int = 256
    max_file_bytes: int = 200 * 1024 * 1024
    max_requests: int = 50_000
    vehicle_prefix: str = "car"
    extra_env: dict[str, str] = field(default_factory=dict)
    trace: Path | None = None
    """State trace every agent replays; None: parked and charging for ever."""
    trace_speed: float = 60.0
    """Trace seconds per real second."""
    resume_after_s: float = 2.0
    """The agents' hysteresis, in trace seconds (production default: 300)."""
    opt_in: bool = True
    """Opt every car in through the owner API at start (as the owner ``embedded-fleet``)."""
    fleet: str = "parked"
    """``parked``: cars parked and charging for ever; ``sim``: cars of the fleet model."""
    sim_params: Any = None
    """`SimParams` for ``fleet="sim"`` (None: the defaults with every owner opted in)."""
    store_url: str | None = None
    """The coordinators' store (None: SQLite in the data directory)."""
    replicas: int = 1
    """Coordinator processes, each on its own HTTP port (``port``, ``port + 1``, ...)."""
    nats_nodes: int = 1
    """1: one nats-server; 3 (or 2+): a routed cluster with clustered JetStream."""
    claim_seconds: float = 30.0
    """How soon a replica takes over a batch duty of one that died."""
    signed_models: bool = True
    """Release the served models over the air, signed by the fleet's operator key, and run
    cars only on what they fetched and verified (False: cars build from their packages)."""
    tls: TlsFiles | None = None
    """Serve HTTPS and NATS over TLS with these files (``make_local_tls`` makes a CA and a
    certificate for this machine); None: plain HTTP and NATS, as on a developer's machine."""
    models: tuple[str, ...] = ("all-MiniLM-L6-v2",)
    """The models every agent serves (empty: the whole catalogue). Tests name what they use,
    so a fleet of embedding cars does not load the LLM; ``idlefleet up`` serves them all."""


class EmbeddedFleet:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self, options: FleetOptions) -> None:
        if options.replicas < 1 or options.nats_nodes < 1:
            raise ValueError("a fleet needs at least one coordinator and one NATS node")
        self.options = options
        self.nats: NatsServer | None = None
        self.cluster: NatsCluster | None = None
        self.coordinators: list[subprocess.Popen[bytes]] = []
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: list[int] = []
        self.port = 0
        self._pick_ports()
        self.log_dir = options.data_dir / "logs"
        self.sim_cars: list[Any] = []
        self.secrets = FleetSecrets(options.data_dir / "secrets")
        self.keys: dict[str, str] = {}
        """API key secrets: ``operator``, ``owner`` (of every embedded car) and ``customer``."""
        self._killed: set[int] = set()
        """Processes killed on purpose (fault drills): their exit is not a failure."""

    def _pick_ports(self) -> None:
        """HTTP ports for the coordinators: ``options.port`` for the first if given, the rest
        free and distinct (picked together)."""
        opts = self.options
        picked = free_ports(opts.host, opts.replicas)
        self.ports = [opts.port, *picked[1:]] if opts.port else picked
        self.port = self.ports[0]

    @property
    def coordinator(self) -> subprocess.Popen[bytes] | None:
        """The first coordinator replica (the one ``base_url`` names)."""
        return self.coordinators[0] if self.coordinators else None

    @property
    def base_url(self) -> str:
        return self.replica_url(0)

    def replica_url(self, index: int) -> str:
        scheme = "https" if self.options.tls is not None else "http"
        return f"{scheme}://{self.options.host}:{self.ports[index]}"

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the fleet's certificates (None: no TLS)."""
        return self.options.tls.ca if self.options.tls is not None else None

    def _ssl(self) -> ssl.SSLContext | None:
        return client_context(self.options.tls.ca) if self.options.tls is not None else None

    @property
    def nats_url(self) -> str:
        """The seed list agents and coordinators get (one URL, or every node of the cluster)."""
        if self.cluster is not None:
            return self.cluster.url
        assert self.nats is not None
        return self.nats.url

    @property
    def api_key(self) -> str:
        """The customer's API key (what an OpenAI client uses)."""
        return self.keys["customer"]

    @property
    def nats_credentials(self) -> dict[str, Any]:
        """``nats.connect`` keyword arguments with the coordinators' identity (every subject),
        and TLS if the fleet uses it: for tests and tools that speak for the cloud, or for many
        scripted cars at once."""
        found: dict[str, Any] = {"nkeys_seed_str": self.secrets.coordinator_seed()}
        if self.options.tls is not None:
            found["tls"] = self._ssl()
        return found

    @property
    def publisher_credentials(self) -> dict[str, Any]:
        """``nats.connect`` keyword arguments as the model publisher (the MODELS account,
        where the models object store lives)."""
        found: dict[str, Any] = {"nkeys_seed_str": self.secrets.publisher_seed()}
        if self.options.tls is not None:
            found["tls"] = self._ssl()
        return found

    @property
    def auth_file(self) -> Path:
        return self.options.data_dir / "nats" / "auth.conf"

    @property
    def store_url(self) -> str:
        if self.options.store_url:
            return self.options.store_url
        return sqlite_url((self.options.data_dir / "coordinator.db").resolve())

    def __enter__(self) -> EmbeddedFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.options.extra_env}
        # The child keeps its own copy of the log descriptor; ours closes with the block.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "idlefleet", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only the supervisor, which stops us
            )

    def start(self, timeout: float = 120.0) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        # Build the model graphs once before the agents start, instead of N times at once.
        from idlefleet.models.catalog import MODELS
        from idlefleet.workloads import for_model

        for model in opts.models or tuple(MODELS):
            workload = for_model(model)
            if workload is None:
                raise ValueError(f"no workload serves model {model}")
            workload.provision(model, opts.data_dir / "models")
        self.keys = prepare_security(self.store_url, self.secrets, self.auth_file)
        if opts.nats_nodes > 1:
            self.cluster = start_nats_cluster(
                opts.data_dir / "nats",
                nodes=opts.nats_nodes,
                auth_file=self.auth_file,
                tls=opts.tls,
            )
        else:
            self.nats = start_nats_server(
                opts.data_dir / "nats", auth_file=self.auth_file, tls=opts.tls
            )
        if opts.signed_models:
            asyncio.run(self._release_models())
        # The coordinators' ports are picked now that NATS holds its own: picked earlier, one
        # of them could be free then and a nats-server's by now (an HTTP health check then
        # read NATS's INFO line).
        self._pick_ports()
        for index in range(opts.replicas):
            self.coordinators.append(self._start_coordinator(index))
        deadline = time.monotonic() + timeout
        for index in range(opts.replicas):
            self._wait(functools.partial(self._healthy, index), deadline, f"coordinator {index}")
        if opts.fleet == "sim":
            self.start_sim_agents()
        else:
            for i in range(opts.agents):
                self.add_agent(f"{opts.vehicle_prefix}-{i + 1:03d}")
        self.wait_for_vehicles(opts.agents, deadline)

    def _start_coordinator(self, index: int) -> subprocess.Popen[bytes]:
        opts = self.options
        return self._spawn(
            "coordinator" if index == 0 else f"coordinator-{index}",
            [
                "coordinator",
                "--nats-url",
                self.nats_url,
                "--store",
                self.store_url,
                "--host",
                opts.host,
                "--port",
                str(self.ports[index]),
                "--replica",
                f"replica-{index}",
                "--lease-seconds",
                str(opts.lease_seconds),
                "--heartbeat-seconds",
                str(opts.heartbeat_seconds),
                "--max-unit",
                str(opts.max_unit),
                "--max-file-bytes",
                str(opts.max_file_bytes),
                "--max-requests",
                str(opts.max_requests),
                "--claim-seconds",
                str(opts.claim_seconds),
                # Every embedded car has one owner: any other car may check a car's results.
                "--verify-by",
                "any-car",
                "--nats-seed",
                str(self.secrets.coordinator_seed_file),
                "--nats-auth-file",
                str(self.auth_file),
                "--nats-publisher-nkey",
                public_nkey(self.secrets.publisher_seed()),
                *self._nats_files(),
                *self._trust_args(server=True),
            ],
        )

    async def _release_models(self) -> None:
        """Sign and publish each served model (as the operator would); a release with the same
        files is not published again."""
        from idlefleet.models.catalog import MODELS
        from idlefleet.models.release import release_model
        from idlefleet.workloads import for_model

        key = self.secrets.signing_key()
        nc = await nats.connect(servers=nats_servers(self.nats_url), **self.publisher_credentials)
        try:
            for model in self.options.models or tuple(MODELS):
                workload = for_model(model)
                assert workload is not None
                await release_model(nc.jetstream(), model, workload.model_files(model), key)
        finally:
            await nc.close()

    def _trust_args(self, server: bool) -> list[str]:
        args = []
        if self.options.signed_models:
            args += ["--trusted-key", str(self.secrets.signing_public_key_file)]
        tls = self.options.tls
        if tls is None:
            return args
        args += ["--nats-ca", str(tls.ca)]
        if server:
            args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        return args

    def _nats_files(self) -> list[str]:
        servers = [self.nats] if self.nats is not None else []
        if self.cluster is not None:
            servers = [node.server for node in self.cluster.nodes if node.server is not None]
        args = []
        for server in servers:
            assert server is not None
            args += ["--nats-pid-file", str(server.pid_file)]
            args += ["--nats-log", str(server.data_dir / "nats-server.log")]
        return args

    def _healthy(self, index: int) -> bool:
        return self.get("/healthz", index) is not None

    def kill_coordinator(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill one replica (a crash: no clean shutdown); the others carry on."""
        process = self.coordinators[index]
        self._killed.add(process.pid)
        process.send_signal(sig)
        process.wait(10)

    def restart_coordinator(self, index: int, timeout: float = 60.0) -> None:
        self.coordinators[index] = self._start_coordinator(index)
        self._wait(
            lambda: self.get("/healthz", index) is not None,
            time.monotonic() + timeout,
            f"coordinator {index}",
        )

    def kill_nats_node(self, index: int) -> None:
        """SIGKILL one node of the NATS cluster; clients fail over to the others."""
        if self.cluster is None:
            raise RuntimeError("this fleet runs one nats-server, not a cluster")
        self.cluster.kill(index)

    def start_sim_agents(self) -> None:
        """One agent per car of the fleet model: its trace, owner policy and hardware."""
        from idlefleet.sim.params import SimParams
        from idlefleet.sim.trace import simulated_cars

        opts = self.options
        params = opts.sim_params or SimParams.build(opt_in_rate=1.0)
        self.sim_cars = simulated_cars(params, opts.agents)
        folder = opts.data_dir / "traces"
        folder.mkdir(parents=True, exist_ok=True)
        for car in self.sim_cars:
            vehicle_id = f"{opts.vehicle_prefix}-{car.index + 1:03d}"
            path = folder / f"sim-{vehicle_id}.jsonl"
            car.trace.save(path)
            self.enrol(vehicle_id)
            self.put(
                f"/fleet/vehicles/{vehicle_id}/policy",
                {"policy": car.policy.model_dump(mode="json")},
            )
            self.add_agent(
                vehicle_id,
                trace=path,
                resume_after_s=params.resume_after_min * 60,
                set_policy=False,
                extra_args=[
                    "--trace-loop",
                    "--accelerator",
                    car.hardware.name,
                    "--tops",
                    str(car.hardware.int8_tops),
                    "--power-w",
                    str(car.hardware.compute_kw * 1000),
                    "--memory-gb",
                    str(car.hardware.memory_gib),
                    "--battery-kwh",
                    str(car.battery_kwh),
                ],
            )

    def default_trace(self, vehicle_id: str = "") -> Path:
        """A trace of a car that stays parked, plugged in and charging, written once; each car
        parks in one of :data:`PARKING` (by its id), so the dashboard's map shows a fleet."""
        from idlefleet.agent.sources.trace import StateTrace, TraceEvent, parked_state

        place = zlib.crc32(vehicle_id.encode()) % len(PARKING)
        path = self.options.data_dir / "traces" / f"parked-charging-{place}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            lat, lon = PARKING[place]
            state = parked_state(latitude=lat, longitude=lon)
            trace = StateTrace.from_events(time.time(), [TraceEvent(0.0, state)])
            trace.save(path)
        return path

    def set_consent(
        self, vehicle_id: str, opted_in: bool, key: str = "owner", **fields: Any
    ) -> Any:
        """Opt a car in or out through the owner API, as the embedded fleet's owner (or, with
        ``key="operator"``, as its operator: for scripted cars that are not enrolled)."""
        body = {"opted_in": opted_in, **fields}
        return self.post(f"/fleet/vehicles/{vehicle_id}/consent", body, key=key)

    def post(self, path: str, body: Any, method: str = "POST", key: str = "operator") -> Any:
        """A JSON request with the API key named ``key`` (``operator``, ``owner``,
        ``customer``); the decoded answer. HTTP errors raise."""
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.keys[key]}",
            },
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10, context=self._ssl()) as response:
            return json.loads(response.read())

    def put(self, path: str, body: Any, key: str = "owner") -> Any:
        return self.post(path, body, method="PUT", key=key)

    def enrol(self, vehicle_id: str) -> str:
        """The car's nkey seed (made once, kept in the data directory), enrolled through the
        operator API under the fleet's owner if it is not yet."""
        seed = self.secrets.car_seed(vehicle_id)
        public = public_nkey(seed)
        enrolments = self.get("/fleet/enrolments") or {"data": []}
        current = {e["vehicle_id"]: e for e in enrolments["data"]}.get(vehicle_id)
        if current is not None and current["status"] == "enrolled" and current["nkey"] == public:
            return seed
        if current is not None and current["status"] == "enrolled":
            self.post(f"/fleet/enrolments/{vehicle_id}", None, method="DELETE")
        body = {"vehicle_id": vehicle_id, "nkey": public, "owner": OWNER}
        self.post("/fleet/enrolments", body)
        return seed

    def add_agent(
        self,
        vehicle_id: str,
        trace: Path | None = None,
        resume_after_s: float | None = None,
        set_policy: bool = True,
        extra_args: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        opts = self.options
        self.enrol(vehicle_id)
        if opts.opt_in and set_policy:
            self.set_consent(vehicle_id, True)
        trace = trace or opts.trace or self.default_trace(vehicle_id)
        resume = opts.resume_after_s if resume_after_s is None else resume_after_s
        process = self._spawn(
            f"agent-{vehicle_id}",
            [
                "agent",
                "--nats-url",
                self.nats_url,
                "--vehicle-id",
                vehicle_id,
                "--cache-dir",
                str(opts.data_dir / "models"),
                "--threads",
                str(opts.threads),
                "--max-unit",
                str(opts.max_unit),
                "--trace",
                str(trace),
                "--trace-speed",
                str(opts.trace_speed),
                "--resume-after",
                str(resume),
                "--models",
                ",".join(opts.models) or "all",
                "--nkey-seed",
                str(self.secrets.car_seed_file(vehicle_id)),
                *self._trust_args(server=False),
                *(extra_args or []),
            ],
        )
        self.agents[vehicle_id] = process
        return process

    def online_vehicles(self) -> list[str]:
        listing = self.get("/fleet/vehicles")
        if not listing:
            return []
        return [v["id"] for v in listing["data"] if v["online"]]

    def wait_for_vehicles(self, n: int, deadline: float) -> None:
        self._wait(lambda: len(self.online_vehicles()) >= n, deadline, f"{n} vehicles")

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for name, process in self._children():
                if process.poll() is not None and process.pid not in self._killed:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode} while waiting for {what}; "
                        f"see {self.log_dir / (name + '.log')}"
                    )
            if ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{what} not ready in time; logs in {self.log_dir}")

    def _children(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        children = [(f"agent-{vid}", p) for vid, p in self.agents.items()]
        for index, process in enumerate(self.coordinators):
            children.append(("coordinator" if index == 0 else f"coordinator-{index}", process))
        return children

    def get(self, path: str, replica: int = 0, key: str = "operator") -> Any:
        """GET with the named API key; the decoded answer, or None if the replica is down."""
        request = urllib.request.Request(
            self.replica_url(replica) + path,
            headers={"Authorization": f"Bearer {self.keys[key]}"} if self.keys else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=5, context=self._ssl()) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def kill_agent(self, vehicle_id: str, sig: int = signal.SIGKILL) -> None:
        process = self.agents[vehicle_id]
        self._killed.add(process.pid)
        process.send_signal(sig)
        process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop agents first (they release their leases), then the coordinators, then NATS."""
        for group in (list(self.agents.values()), self.coordinators):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.nats is not None:
            self.nats.stop()
        if self.cluster is not None:
            self.cluster.stop()
