"""A real nats-server cluster on one machine: routes between N nodes and clustered JetStream.

It is what the embedded single server is, times N, for tests and demos of failover: each node
has a name, its own client, route and monitoring ports (picked free up front, since every node's
config must list every route) and its own JetStream store. A node counts as started when it has
logged both "Server is ready" and its route listener (the route port is bound after the ready
line), and the cluster counts as formed when every running node sees a route to every other one
and answers 200 on ``/healthz``. That plain health check is the one that waits for a JetStream
meta leader and for this node's streams to be current; ``/healthz?js-enabled-only=true`` says
200 before any leader exists, when creating a replicated stream still times out.

Clients get every node's URL as one seed list (``NatsCluster.url``; see
:mod:`idlefleet.protocol.seeds`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from idlefleet.embedded.nats_server import (
    READY_LINE,
    NatsServer,
    NatsServerStartError,
    jetstream_config,
    launch_nats_server,
    security_config,
)
from idlefleet.embedded.ports import free_ports as _free_ports
from idlefleet.embedded.tls import TlsFiles

__all__ = ["ClusterNode", "NatsCluster", "start_nats_cluster"]

CLUSTER_NAME = "idlefleet"
_ROUTE_LINE = re.compile(r"Listening for route connections on")
_POLL_SECONDS = 0.05  # between looks at the monitoring endpoints while the cluster forms
# Our own monitoring ports on our own host: never through an http_proxy from the environment.
_MONITOR = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ClusterNode:
    """One member of a `NatsCluster`: its name, ports and directory stay; its process may not."""

    name: str
    host: str
    client_port: int
    route_port: int
    monitor_port: int
    data_dir: Path
    server: NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.route_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats-server.pid"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.server is not None:
            self.server.stop(timeout)
            self.server = None


class NatsCluster:
    """N nats-server processes routed to each other; made by `start_nats_cluster`.

    Only processes this object started are signalled, by their PID. ``with`` stops them all.
    """

    def __init__(self, nodes: list[ClusterNode]) -> None:
        self.nodes = nodes

    @property
    def urls(self) -> list[str]:
        """One client URL per node, in node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The seed list as one string, ``nats://a:1,nats://b:2,...`` (see `nats_servers`)."""
        return ",".join(self.urls)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no goodbye to its routes or clients) and reap it."""
        node = self.nodes[index]
        if node.server is None or not node.running:
            raise RuntimeError(f"{node.name} is not running")
        node.server.process.kill()
        node.server.wait_stopped()
        node.server = None  # we drop every handle we stop: one left on a dead process died

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again on its ports and store; return once it has rejoined."""
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is already running")
        deadline = time.monotonic() + timeout
        self._launch(node, timeout)
        self._wait_formed(deadline)

    def routed_peers(self, index: int) -> set[str]:
        """Names of the nodes that node ``index`` has a route to, from its ``/routez``."""
        # Since 2.10 a pair of servers keeps a pool of route connections (3 by default) plus one
        # for the system account, so num_routes is 4 per peer: count names, not connections.
        _, routez = _get_json(f"{self.nodes[index].monitor_url}/routez")
        return {route["remote_name"] for route in routez.get("routes") or []}

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every node we started, then wait for each (SIGKILL after ``timeout``)."""
        started = [(node, node.server) for node in self.nodes if node.server is not None]
        for _, server in started:
            server.terminate()  # all at once, so they do not each wait for lost peers
        for node, server in started:
            server.wait_stopped(timeout)
            node.server = None

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, node: ClusterNode, timeout: float) -> None:
        process, drainer, _ = launch_nats_server(
            ["-c", str(node.config_path)], node.log_path, [READY_LINE, _ROUTE_LINE], timeout
        )
        node.server = NatsServer(process, node.host, node.client_port, node.data_dir, drainer)

    def _wait_formed(self, deadline: float) -> None:
        """Poll until each running node routes to all others and its ``/healthz`` says 200."""
        while True:
            for node in self.nodes:
                if node.server is not None and not node.running:
                    raise NatsServerStartError(f"{node.name} exited", _log_tail(node))
            running = {i: node for i, node in enumerate(self.nodes) if node.server is not None}
            names = {node.name for node in running.values()}
            waiting = {}
            for i, node in running.items():
                peers = self.routed_peers(i)
                status, health = _get_json(f"{node.monitor_url}/healthz")
                if peers != names - {node.name} or status != 200:
                    waiting[node.name] = f"routes to {sorted(peers)}, healthz {status} {health}"
            if not waiting:
                return
            if time.monotonic() >= deadline:
                detail = "; ".join(f"{name}: {state}" for name, state in waiting.items())
                raise TimeoutError(f"NATS cluster not formed in time: {detail}")
            time.sleep(_POLL_SECONDS)


def start_nats_cluster(
    data_dir: Path,
    nodes: int = 3,
    host: str = "127.0.0.1",
    timeout: float = 30,
    auth_file: Path | None = None,
    tls: TlsFiles | None = None,
) -> NatsCluster:
    """Start ``nodes`` routed servers with clustered JetStream under ``data_dir/node-<i>``.

    Returns once the cluster is formed (see the module docstring). Ports are found free by
    binding to port 0 and released before the servers bind them, so another process may take
    one in between: on "address already in use" the whole start is retried once on new ports.

    Three nodes is the smallest cluster that keeps JetStream up with one node down; two form,
    but need both for a quorum. One node with a cluster block waits for peers forever.
    """
    if nodes < 2:
        raise ValueError(
            f"a NATS cluster needs at least 2 nodes (use start_nats_server), got {nodes}"
        )
    deadline = time.monotonic() + timeout
    stores = [_node_dir(data_dir, i) / "jetstream" for i in range(nodes)]
    new_stores = [store for store in stores if not store.exists()]
    try:
        return _start(_plan(data_dir, nodes, host, auth_file, tls), deadline)
    except NatsServerStartError as error:
        if not error.address_in_use:
            raise
    # Raft state the failed attempt left in a new store delays the next meta election by a full
    # election timeout (4-9 s): start those from empty again. Older stores are kept.
    for store in new_stores:
        shutil.rmtree(store, ignore_errors=True)
    return _start(_plan(data_dir, nodes, host, auth_file, tls), deadline)


def _start(nodes: list[ClusterNode], deadline: float) -> NatsCluster:
    """Launch every node one after the other, then wait for the cluster; stop all on failure."""
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            cluster._launch(node, max(0.0, deadline - time.monotonic()))
        cluster._wait_formed(deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _plan(
    data_dir: Path,
    count: int,
    host: str,
    auth_file: Path | None = None,
    tls: TlsFiles | None = None,
) -> list[ClusterNode]:
    """Name, ports and directory for each node, with its config file written."""
    ports = _free_ports(host, 3 * count)
    nodes = [
        ClusterNode(
            name=f"node-{i}",
            host=host,
            client_port=ports[3 * i],
            route_port=ports[3 * i + 1],
            monitor_port=ports[3 * i + 2],
            data_dir=_node_dir(data_dir, i),
        )
        for i in range(count)
    ]
    routes = "".join(f'    "{node.route_url}"\n' for node in nodes)  # itself too: it skips it
    for node in nodes:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(
            "# written by idlefleet\n"
            f'server_name: "{node.name}"\n'
            f'listen: "{host}:{node.client_port}"\n'
            f'http: "{host}:{node.monitor_port}"\n'
            + jetstream_config(node.data_dir / "jetstream")
            + security_config(node.data_dir, auth_file, node.pid_file, tls)
            + f'cluster {{\n  name: "{CLUSTER_NAME}"\n  listen: "{host}:{node.route_port}"\n'
            f"  routes: [\n{routes}  ]\n}}\n"
        )
    return nodes


def _node_dir(data_dir: Path, index: int) -> Path:
    return data_dir / f"node-{index}"


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a monitoring endpoint; status 0 if nothing answered."""
    try:
        with _MONITOR.open(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            body = error.read()
        return error.code, json.loads(body) if body else {}
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        return 0, {"error": str(error)}


def _log_tail(node: ClusterNode) -> str:
    return node.log_path.read_text()[-2000:] if node.log_path.exists() else ""
