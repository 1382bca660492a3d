"""The ``idlefleet`` command: ``up`` (embedded fleet), ``coordinator``, ``owner``, ``agent``.

Arguments are validated here, at the boundary: a bad one ends the command with exit status 2
and a message that says what is wrong, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from idlefleet import __version__
from idlefleet.cli.argtypes import share, whole
from idlefleet.coordinator.ledger import Prices

if TYPE_CHECKING:
    from idlefleet.agent.sources.base import StateSource


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_list(text: str) -> tuple[str, ...]:
    """``--models``: catalogue ids or aliases, comma-separated; ``all``: every model (``()``)."""
    from idlefleet.models.catalog import MODELS, resolve_model

    if text.strip() == "all":
        return ()
    names = [n.strip() for n in text.split(",")]
    models = []
    for name in names:
        info = resolve_model(name)
        if info is None:
            raise argparse.ArgumentTypeError(
                f"unknown model {name!r}; the catalogue has {', '.join(MODELS)} (or 'all')"
            )
        models.append(info.id)
    return tuple(dict.fromkeys(models))


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0 picks a free one), got {text}")
    return value


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return path


def _price_list(text: str) -> Prices:
    try:
        return Prices.load(_readable_file(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _nats_seeds(text: str) -> str:
    from idlefleet.protocol.seeds import nats_servers

    try:
        nats_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from idlefleet.models.catalog import MODELS

    parser = argparse.ArgumentParser(
        prog="idlefleet", description="Parked electric vehicles as an AI inference cloud."
    )
    parser.add_argument("--version", action="version", version=f"idlefleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run nats-server, the coordinator and N agents on this machine")
    up.add_argument("--data-dir", type=Path, default=Path(".idlefleet"), help="state directory")
    up.add_argument("--agents", type=_positive_int, default=2, help="vehicle agents (default 2)")
    up.add_argument("--threads", type=_positive_int, default=1, help="ONNX threads per agent")
    up.add_argument(
        "--models",
        type=_model_list,
        default=(),
        help="comma-separated models the agents serve (default: every model of the catalogue)",
    )
    up.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    up.add_argument("--port", type=_port, default=None, help="HTTP port (default 8000; demo: free)")
    up.add_argument("--lease-seconds", type=_positive_float, default=30.0)
    up.add_argument("--demo", action="store_true", help="submit a demo batch, summarise, exit")
    up.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS and NATS over TLS, with a CA made for this machine (in the data directory)",
    )
    up.add_argument("--demo-requests", type=_positive_int, default=1000)
    up.add_argument(
        "--fleet",
        choices=("parked", "sim"),
        default="parked",
        help="parked: cars parked and charging for ever (default); sim: cars of the fleet model, "
        "driving off and coming back as the model says",
    )
    up.add_argument(
        "--sim-speed",
        type=_positive_float,
        default=720.0,
        help="--fleet sim: simulated seconds per real second (default 720: a day in 2 minutes)",
    )
    up.add_argument("--sim-seed", type=whole(0), help="--fleet sim: the model's seed (default 0)")
    up.add_argument(
        "--store",
        help="the coordinators' store (default: SQLite in --data-dir); a postgresql:// URL lets "
        "several replicas share it",
    )
    up.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        help="coordinator processes in one queue group (more than 1 needs --store postgresql://…)",
    )
    up.add_argument(
        "--nats-cluster",
        type=_positive_int,
        default=1,
        metavar="NODES",
        help="nats-server nodes: 1 (default) or a routed cluster of 3 with clustered JetStream",
    )
    up.add_argument(
        "--sim-params",
        type=Path,
        help="--fleet sim: fleet-model parameters (JSON; default: the model's defaults with "
        "every owner opted in)",
    )

    co = sub.add_parser("coordinator", help="run one coordinator replica")
    co.add_argument(
        "--nats-url",
        required=True,
        type=_nats_seeds,
        help="NATS URL, or every node of a cluster: nats://a:4222,nats://b:4222",
    )
    co.add_argument(
        "--store",
        default="sqlite:///.idlefleet/coordinator.db",
        help="store URL: sqlite:///file.db (default) or postgresql://user@host/db (replicas)",
    )
    co.add_argument("--replica", default="", help="name of this replica (default: host-pid)")
    co.add_argument("--host", default="127.0.0.1")
    co.add_argument("--port", type=_port, default=8000)
    co.add_argument("--lease-seconds", type=_positive_float, default=30.0)
    co.add_argument("--max-unit", type=_positive_int, default=256, help="max requests per unit")
    co.add_argument("--heartbeat-seconds", type=_positive_float, default=5.0)
    co.add_argument(
        "--max-file-bytes", type=_positive_int, default=200 * 1024 * 1024, help="upload limit"
    )
    co.add_argument("--max-requests", type=_positive_int, default=50_000, help="per batch")
    co.add_argument(
        "--claim-seconds",
        type=_positive_float,
        default=30.0,
        help="how long a replica's claim on a batch duty lasts unless renewed (default 30)",
    )
    co.add_argument(
        "--nats-seed",
        type=_readable_file,
        default=None,
        help="file holding the coordinators' NATS nkey seed (SU...); needed when nats-server "
        "requires authentication",
    )
    co.add_argument(
        "--nats-auth-file",
        type=Path,
        default=None,
        help="keep this nats-server accounts file equal to the enrolled cars (needs --nats-seed)",
    )
    co.add_argument(
        "--nats-publisher-nkey",
        default=None,
        help="the model publisher's public nkey (U...): the user of the MODELS account in "
        "--nats-auth-file",
    )
    co.add_argument(
        "--nats-pid-file",
        type=Path,
        action="append",
        default=[],
        help="nats-server pid file to signal after rewriting --nats-auth-file (repeatable)",
    )
    co.add_argument(
        "--nats-log",
        type=Path,
        action="append",
        default=[],
        help="nats-server log file in which to count refused connections (repeatable)",
    )
    co.add_argument(
        "--nats-ca", type=_readable_file, default=None, help="CA to verify NATS's TLS with"
    )
    co.add_argument(
        "--trusted-key",
        type=_readable_file,
        action="append",
        default=[],
        help="the operator's model-signing public key (PEM; repeatable): work grants name the "
        "current release of each model it signed",
    )
    co.add_argument("--tls-cert", type=_readable_file, default=None, help="serve HTTPS: cert")
    co.add_argument("--tls-key", type=_readable_file, default=None, help="serve HTTPS: key")
    co.add_argument(
        "--verify-floor",
        type=share,
        default=0.02,
        help="share of a trusted car's work re-run on other cars to verify it, at least "
        "(0 < x <= 1; default 0.02)",
    )
    co.add_argument(
        "--prices",
        type=_price_list,
        default=None,
        help="the price list (JSON: per-model prices per 1k input/output tokens and per "
        "request, the owners' share, electricity tariffs; micro-units; see "
        "docs/ARCHITECTURE.md, Ledger). Default: the built-in list",
    )
    co.add_argument(
        "--metrics-need-key",
        action="store_true",
        help="/metrics answers only the operator's key (default: anyone, as Prometheus "
        "exporters do)",
    )
    co.add_argument(
        "--verify-by",
        choices=("other-owner", "any-car"),
        default="other-owner",
        help="who checks a car's results: cars of other owners (default), or any other car "
        "(a fleet of one owner)",
    )

    from idlefleet.cli.capacity import add_capacity_parser
    from idlefleet.cli.owner import add_owner_parser
    from idlefleet.cli.sim import add_sim_parser

    add_owner_parser(sub)
    from idlefleet.cli.admin import add_admin_parsers

    add_admin_parsers(sub)
    add_sim_parser(sub)
    add_capacity_parser(sub)

    ag = sub.add_parser("agent", help="run one vehicle agent")
    ag.add_argument(
        "--nats-url",
        required=True,
        type=_nats_seeds,
        help="NATS URL, or every node of a cluster (the agent fails over between them)",
    )
    ag.add_argument("--vehicle-id", required=True)
    ag.add_argument("--cache-dir", type=Path, default=Path(".idlefleet/models"))
    ag.add_argument("--threads", type=_positive_int, default=1)
    ag.add_argument("--accelerator", default="cpu")
    ag.add_argument("--tops", type=_positive_float, default=1.0)
    ag.add_argument("--memory-gb", type=_positive_float, default=4.0)
    ag.add_argument("--power-w", type=_positive_float, default=65.0)
    ag.add_argument(
        "--precision",
        choices=sorted({p for m in MODELS.values() for p in m.precisions}),
        default="fp32",
        help="the precision of the car's model weights, a hardware class of its own: fp16 "
        "builds float16 weights (models that have them; default fp32)",
    )
    ag.add_argument("--max-unit", type=_positive_int, default=256)
    ag.add_argument(
        "--models",
        type=_model_list,
        default=(),
        help="comma-separated models this car serves (default: every model of the catalogue)",
    )
    state = ag.add_mutually_exclusive_group(required=True)
    state.add_argument(
        "--trace", type=Path, help="replay this state trace (JSON Lines) as the car's VSS state"
    )
    state.add_argument(
        "--kuksa",
        metavar="HOST:PORT",
        help="read the car from a KUKSA databroker (needs: pip install 'idlefleet[kuksa]')",
    )
    ag.add_argument(
        "--trace-speed", type=_positive_float, default=1.0, help="trace seconds per real second"
    )
    ag.add_argument("--trace-loop", action="store_true", help="replay the trace again and again")
    ag.add_argument(
        "--resume-after",
        type=_non_negative_float,
        default=300.0,
        help="seconds the car must stay fit to compute before work resumes (default 300)",
    )
    ag.add_argument("--battery-kwh", type=_positive_float, default=75.0)
    ag.add_argument(
        "--nkey-seed",
        type=Path,
        default=None,
        help="the car's NATS identity: a seed file, made (mode 0600) if missing; its public "
        "key, printed at start, is what the operator enrols",
    )
    ag.add_argument(
        "--nats-ca", type=_readable_file, default=None, help="CA to verify NATS's TLS with"
    )
    ag.add_argument(
        "--trusted-key",
        type=_readable_file,
        action="append",
        default=[],
        help="the operator's model-signing public key (PEM; repeatable): run only models "
        "released over the air and signed by it, instead of this machine's packages",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "up":
            from idlefleet.cli.up import run_up

            return run_up(args)
        if args.command == "owner":
            from idlefleet.cli.owner import run_owner

            return run_owner(args)
        if args.command in ("keys", "cars", "models"):
            from idlefleet.cli.admin import run_cars, run_keys, run_models

            run = {"keys": run_keys, "cars": run_cars, "models": run_models}[args.command]
            return run(args)
        if args.command == "sim":
            from idlefleet.cli.sim import run_sim

            return run_sim(args)
        if args.command == "capacity":
            from idlefleet.cli.capacity import run_capacity

            return run_capacity(args)
        if args.command == "coordinator":
            return _coordinator(args)
        return _agent(args)
    except ValueError as exc:  # a configuration value the parser could not see was wrong
        print(f"idlefleet {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _coordinator(args: argparse.Namespace) -> int:
    from idlefleet.coordinator.batches import BatchLimits
    from idlefleet.coordinator.planner import UnitPolicy
    from idlefleet.coordinator.server import CoordinatorConfig, run_coordinator
    from idlefleet.coordinator.trust import TrustPolicy

    config = CoordinatorConfig(
        nats_url=args.nats_url,
        store_url=args.store,
        host=args.host,
        port=args.port,
        units=UnitPolicy(max_requests=args.max_unit, lease_seconds=args.lease_seconds),
        heartbeat_interval_s=args.heartbeat_seconds,
        limits=BatchLimits(
            max_file_bytes=args.max_file_bytes,
            max_requests=args.max_requests,
            claim_seconds=args.claim_seconds,
        ),
        replica=args.replica,
        nats_seed=args.nats_seed,
        nats_auth_file=args.nats_auth_file,
        nats_publisher=args.nats_publisher_nkey,
        nats_pid_files=tuple(args.nats_pid_file),
        nats_logs=tuple(args.nats_log),
        nats_ca=args.nats_ca,
        trusted_keys=tuple(args.trusted_key),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        trust=TrustPolicy(floor=args.verify_floor),
        verify_distinct_owners=args.verify_by == "other-owner",
        prices=args.prices or Prices(),
        metrics_need_key=args.metrics_need_key,
    )
    if (config.tls_cert is None) != (config.tls_key is None):
        raise SystemExit("idlefleet coordinator: --tls-cert and --tls-key go together")
    if config.nats_auth_file is not None and config.nats_seed is None:
        raise SystemExit("idlefleet coordinator: --nats-auth-file needs --nats-seed")
    asyncio.run(run_coordinator(config))
    return 0


def _state_source(args: argparse.Namespace) -> StateSource:
    """The car's state source from ``--trace`` or ``--kuksa`` (ValueError if unusable)."""
    if args.trace is not None:
        from idlefleet.agent.sources.trace import StateTrace, TraceSource

        return TraceSource(
            StateTrace.load(args.trace), speed=args.trace_speed, loop=args.trace_loop
        )
    host, sep, port = str(args.kuksa).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--kuksa {args.kuksa!r} must be HOST:PORT, e.g. 127.0.0.1:55555")
    from idlefleet.agent.sources.kuksa import KuksaSource

    return KuksaSource(host, int(port))


def _agent(args: argparse.Namespace) -> int:
    from idlefleet.agent.config import AgentConfig
    from idlefleet.agent.runtime import RUNTIME
    from idlefleet.agent.supervise import AgentTaskDied
    from idlefleet.agent.worker import VehicleAgent
    from idlefleet.protocol.identity import load_or_create_seed, public_nkey
    from idlefleet.protocol.messages import Hardware
    from idlefleet.workloads import for_model

    config = AgentConfig(
        vehicle_id=args.vehicle_id,
        nats_url=args.nats_url,
        cache_dir=args.cache_dir,
        hardware=Hardware(
            accelerator=args.accelerator,
            tops=args.tops,
            memory_gb=args.memory_gb,
            power_w=args.power_w,
            runtime=RUNTIME,
            precision=args.precision,
        ),
        threads=args.threads,
        max_unit_requests=args.max_unit,
        chunk_requests=min(64, args.max_unit),
        resume_after_s=args.resume_after,
        battery_kwh=args.battery_kwh,
        models=args.models,
        nkey_seed=None if args.nkey_seed is None else load_or_create_seed(args.nkey_seed),
        nats_ca=args.nats_ca,
    )
    if config.nkey_seed is not None:
        print(f"idlefleet agent {config.vehicle_id}: nkey {public_nkey(config.nkey_seed)}")
    source = _state_source(args)
    releases = None
    sources: dict[str, Path] = {}
    if args.trusted_key:
        from idlefleet.agent.releases import CarReleases
        from idlefleet.agent.worker import fetch_releases
        from idlefleet.models.manifest import load_public_key, trusted_keys

        trusted = trusted_keys(load_public_key(path) for path in args.trusted_key)
        releases = CarReleases(config.cache_dir, trusted)
        sources = asyncio.run(fetch_releases(config, releases, config.served_models()))
        if not sources:
            print(
                f"idlefleet agent {config.vehicle_id}: no model release could be verified",
                file=sys.stderr,
            )
            return 1
    # Each model is loaded before the agent registers it, so that registering never promises
    # a model that cannot run.
    runners = {}
    for model in config.served_models() if releases is None else tuple(sources):
        workload = for_model(model)
        if workload is None:
            raise ValueError(f"no workload serves model {model}")
        runners[model] = workload.runner_at(
            config.hardware.precision, model, config.cache_dir, config.threads, sources.get(model)
        )
    config = config.run_on(r.provider for r in runners.values())

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await VehicleAgent(config, runners, source, releases).run(stop)

    try:
        asyncio.run(serve())
    except AgentTaskDied as died:  # logged with its cause; the leases were released
        print(f"idlefleet agent {config.vehicle_id}: {died}", file=sys.stderr)
        return 1
    return 0
