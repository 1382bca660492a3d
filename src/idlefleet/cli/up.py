"""``idlefleet up``: the embedded fleet in one command, with clean shutdown on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import socket
import threading
from typing import Any

from idlefleet.coordinator.statements import money
from idlefleet.embedded.fleet import EmbeddedFleet, FleetOptions
from idlefleet.sim.params import SimParams, load_params

DEFAULT_PORT = 8000


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _sim_params(args: argparse.Namespace) -> SimParams:
    """The model behind ``--fleet sim``; a bad file raises ParamsError (exit 2 with the reason)."""
    seed = {} if args.sim_seed is None else {"seed": args.sim_seed}
    if args.sim_params is not None:
        return load_params(args.sim_params, **seed)
    return SimParams.build(opt_in_rate=1.0, **seed)


def run_up(args: argparse.Namespace) -> int:
    port = args.port
    if port is None:
        port = 0 if args.demo else DEFAULT_PORT
    if port and not _port_free(args.host, port):
        raise ValueError(f"port {port} on {args.host} is in use; pick another with --port")
    store = _checked_store(args.store, args.replicas)
    if args.nats_cluster == 2:
        raise ValueError("--nats-cluster 2 cannot survive losing a node; use 1 or 3 (or more)")
    options = FleetOptions(
        data_dir=args.data_dir.resolve(),
        agents=args.agents,
        threads=args.threads,
        models=args.models,
        host=args.host,
        port=port,
        lease_seconds=args.lease_seconds,
        store_url=store,
        replicas=args.replicas,
        nats_nodes=args.nats_cluster,
    )
    if args.tls:
        from idlefleet.embedded.tls import make_local_tls

        options.tls = make_local_tls(options.data_dir / "secrets" / "tls", (args.host,))
    if args.fleet == "sim":
        options.fleet = "sim"
        options.trace_speed = args.sim_speed
        options.sim_params = _sim_params(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet = EmbeddedFleet(options)
    print(
        f"idlefleet: starting {_plural(args.nats_cluster, 'nats-server')}, "
        f"{_plural(args.replicas, 'coordinator')} and {args.agents} agents …",
        flush=True,
    )
    try:
        fleet.start()
        print(f"idlefleet: NATS        {fleet.nats_url}")
        print(f"idlefleet: store       {_redacted(fleet.store_url)}")
        for index in range(args.replicas):
            url = fleet.replica_url(index)
            print(f"idlefleet: OpenAI API  {url}/v1   (docs: {url}/docs)")
        first = fleet.replica_url(0)
        print(f"idlefleet: dashboard   {first}/dashboard#key={fleet.keys['operator']}")
        print(f"idlefleet: metrics     {first}/metrics   (Prometheus)")
        print(f"idlefleet: API key     {fleet.api_key}   (a customer's)")
        print(f"idlefleet: all keys    {fleet.secrets.keys_file}")
        if fleet.ca_file is not None:
            print(f"idlefleet: TLS CA      {fleet.ca_file}")
        print(f"idlefleet: vehicles    {', '.join(fleet.online_vehicles())}", flush=True)
        days = options.sim_params.days if options.sim_params else 0
        for car in fleet.sim_cars:
            policy = car.policy
            hours = ", ".join(policy.allowed_hours) or "any hour"
            print(
                f"idlefleet:   car {car.index + 1:03d}: {car.hardware.name} in {car.region.name}; "
                f"{'charging only, ' if policy.charging_only else ''}"
                f"floor {policy.soc_floor_percent:g} %, {hours}"
                f"; the model: {len(car.trips)} trips, {len(car.sessions)} compute sessions "
                f"in {days} days",
                flush=True,
            )
        if args.demo:
            return _demo(fleet, args.demo_requests)
        print("idlefleet: up; press Ctrl-C to stop", flush=True)
        stop.wait()
        return 0
    finally:
        print("idlefleet: stopping agents, coordinators, NATS …", flush=True)
        fleet.stop()
        print("idlefleet: stopped", flush=True)


def _checked_store(url: str | None, replicas: int) -> str | None:
    """The ``--store`` URL, refused before anything starts if replicas could not share it."""
    if url is None:
        if replicas > 1:
            raise ValueError(
                "--replicas above 1 needs a shared store: --store postgresql://user@host/db"
            )
        return None
    from idlefleet.coordinator.store import open_store

    open_store(url).close()  # fails now, with the reason, rather than in N child processes
    return url


def _redacted(url: str) -> str:
    """A store URL without its password, for printing."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _plural(n: int, thing: str) -> str:
    return f"{n} {thing}s" if n != 1 else f"1 {thing}"


def money_lines(entries: list[dict[str, Any]], currency: str) -> list[str]:
    """What a batch cost its customer and earned each owner (its ledger entries)."""
    charges = [e for e in entries if e["kind"] == "charge"]
    settled = {e["settles"]: e["kind"] for e in entries if e["settles"]}
    if not charges:
        return []
    cost = sum(
        -p["amount"] for e in charges for p in e["postings"] if p["account"].startswith("customer:")
    )
    tokens = sum(e["input_tokens"] + e["output_tokens"] for e in charges)
    lines = [f"cost         {money(cost)} {currency} to the customer ({tokens} tokens)"]
    owners: dict[str, list[int]] = {}
    for e in charges:
        earned = sum(p["amount"] for p in e["postings"] if p["account"] == f"escrow:{e['owner']}")
        row = owners.setdefault(e["owner"], [0, 0, 0])
        row[0 if settled.get(e["id"]) == "release" else 1] += earned
        row[2] += e["electricity"]
    for owner, (payable, escrow, power) in sorted(owners.items()):
        lines.append(
            f"earnings     {owner}: {money(payable + escrow)} {currency} "
            f"({money(escrow)} in escrow until verified); electricity {money(power)} {currency}"
        )
    return lines


def _demo(fleet: EmbeddedFleet, n: int) -> int:
    from idlefleet.cli.demo import run_demo

    def usage(batch_id: str) -> dict[str, int]:
        found = fleet.get(f"/fleet/batches/{batch_id}/vehicles")
        return dict(found["completed_by_vehicle"]) if found else {}

    from idlefleet.models.catalog import SMOLLM2

    models = fleet.options.models
    with_chat = not models or SMOLLM2.id in models
    summary = run_demo(fleet.base_url, n, usage, fleet.api_key, chat=with_chat, ca=fleet.ca_file)
    print()
    print(f"batch        {summary.batch_id}: {summary.status}")
    print(
        f"requests     {summary.requests} ({summary.completed} completed, {summary.failed} failed)"
    )
    print(
        f"vehicles     {len(summary.vehicles)} used: "
        + ", ".join(f"{vid} ({count})" for vid, count in sorted(summary.vehicles.items()))
    )
    print(f"wall time    {summary.seconds:.2f} s (create → completed)")
    print(f"throughput   {summary.throughput:.0f} requests/s")
    ledger = fleet.get(f"/fleet/ledger?batch_id={summary.batch_id}")
    if ledger:
        for line in money_lines(ledger["data"], ledger["currency"]):
            print(line)
    if summary.chat is not None:
        chat = summary.chat
        print(f"chat         {chat.question}")
        print(f"             {chat.answer}")
        print(
            f"             ({chat.completion_tokens} tokens from a car in {chat.chunks} "
            f"server-sent events, {chat.seconds:.2f} s)"
        )
    return 0
