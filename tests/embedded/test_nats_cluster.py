"""A real 3-node nats-server cluster on loopback: routes, clustered JetStream, failover, seeds."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from idlefleet.embedded import nats_cluster
from idlefleet.embedded.nats_cluster import NatsCluster, start_nats_cluster
from idlefleet.embedded.nats_server import MAX_PAYLOAD_BYTES
from idlefleet.protocol.seeds import nats_servers

T = TypeVar("T")

# A killed stream or meta leader is replaced only after a Raft election timeout (4-9 s in
# nats-server), so JetStream gets this long; core request/reply must come back much sooner.
JETSTREAM_FAILOVER_SECONDS = 15.0
REQUEST_FAILOVER_SECONDS = 5.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with start_nats_cluster(tmp_path / "nats") as running:
        yield running


async def retry(action: Callable[[], Awaitable[T]], within: float) -> T:
    """Await ``action()`` until it succeeds; NATS errors mean "not yet" for ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await action()
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


def node_of(cluster: NatsCluster, client: Client) -> int:
    assert client.connected_url is not None
    ports = [node.client_port for node in cluster.nodes]
    return ports.index(client.connected_url.port)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_three_nodes_route_to_each_other_and_replicate_a_stream(cluster: NatsCluster) -> None:
    names = {node.name for node in cluster.nodes}

    async def scenario() -> tuple[int, bytes, StreamInfo]:
        nc = await nats.connect(servers=cluster.urls)
        try:
            # No retry: a replicated stream must be creatable the moment the cluster is started.
            js = nc.jetstream(timeout=2)
            await js.add_stream(name="UNITS", subjects=["units.>"], num_replicas=3)
            ack = await js.publish("units.a", b"hello")
            stored = await js.get_msg("UNITS", ack.seq)
            return nc.max_payload, stored.data or b"", await js.stream_info("UNITS")
        finally:
            await nc.close()

    max_payload, data, info = asyncio.run(scenario())

    assert [cluster.routed_peers(i) for i in range(3)] == [
        names - {node.name} for node in cluster.nodes
    ]
    assert nats_servers(cluster.url) == cluster.urls and len(set(cluster.urls)) == 3
    assert data == b"hello"
    assert info.config.num_replicas == 3 and info.cluster is not None
    assert {info.cluster.leader, *(peer.name for peer in info.cluster.replicas or [])} == names
    assert max_payload == MAX_PAYLOAD_BYTES


@dataclass
class Failover:
    victim: int
    led_stream: bool
    reconnected: bool
    now_on: int
    reply: bytes
    request_seconds: float
    jetstream_seconds: float
    new_leader: str | None
    messages_while_degraded: int
    solo_reply: bytes
    last: bytes
    healed: set[str]


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_client_fails_over_when_its_node_is_killed_and_the_node_rejoins(
    cluster: NatsCluster,
) -> None:
    names = {node.name for node in cluster.nodes}

    async def scenario() -> Failover:
        setup = await nats.connect(servers=cluster.urls)
        try:
            created = await setup.jetstream().add_stream(
                name="UNITS", subjects=["units.>"], num_replicas=3
            )
        finally:
            await setup.close()
        assert created.cluster is not None
        leader = [node.name for node in cluster.nodes].index(created.cluster.leader or "")
        others = [url for i, url in enumerate(cluster.urls) if i != leader]
        reconnected = asyncio.Event()

        async def on_reconnected() -> None:
            reconnected.set()

        # Every seed URL, the stream leader's first: killing the requester's node then always
        # kills the stream leader too, the slow case (a Raft election), not a lucky one.
        requester = await nats.connect(
            servers=[cluster.urls[leader], *others],
            dont_randomize=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            reconnected_cb=on_reconnected,
        )
        responder = await nats.connect(servers=others)
        solo: Client | None = None
        try:
            victim = node_of(cluster, requester)

            async def echo(msg: Msg) -> None:
                await msg.respond(b"echo:" + msg.data)

            await responder.subscribe("echo", cb=echo)
            js = requester.jetstream(timeout=1)
            for n in range(5):
                # A message id makes a publish retried after a lost ack land once.
                await js.publish("units.before", b"%d" % n, headers={"Nats-Msg-Id": f"b{n}"})
            await retry(lambda: requester.request("echo", b"warm", timeout=0.5), within=5)

            await asyncio.to_thread(cluster.kill, victim)
            killed = time.monotonic()
            reply = await retry(
                lambda: requester.request("echo", b"after", timeout=0.5),
                within=REQUEST_FAILOVER_SECONDS,
            )
            request_seconds = time.monotonic() - killed
            await retry(
                lambda: js.publish("units.after", b"5", headers={"Nats-Msg-Id": "a0"}),
                within=JETSTREAM_FAILOVER_SECONDS,
            )
            jetstream_seconds = time.monotonic() - killed
            degraded = await js.stream_info("UNITS")

            await asyncio.to_thread(cluster.start_node, victim)
            solo = await nats.connect(servers=[cluster.urls[victim]])
            solo_reply = await retry(lambda: solo.request("echo", b"solo", timeout=0.5), 5)
            last = await js.get_msg("UNITS", 6)
            healed = await retry(lambda: all_replicas_current(js), within=10)
            return Failover(
                victim=victim,
                led_stream=victim == leader,
                reconnected=reconnected.is_set(),
                now_on=node_of(cluster, requester),
                reply=reply.data,
                request_seconds=request_seconds,
                jetstream_seconds=jetstream_seconds,
                new_leader=degraded.cluster.leader if degraded.cluster else None,
                messages_while_degraded=degraded.state.messages,
                solo_reply=solo_reply.data,
                last=last.data or b"",
                healed=healed,
            )
        finally:
            for client in (requester, responder, solo):
                if client is not None:
                    await client.close()

    seen = asyncio.run(scenario())

    victim = cluster.nodes[seen.victim]
    assert seen.led_stream
    assert seen.reconnected and seen.now_on != seen.victim
    assert seen.reply == b"echo:after"
    assert seen.request_seconds < REQUEST_FAILOVER_SECONDS
    assert seen.new_leader in names - {victim.name}
    assert seen.messages_while_degraded == 6
    assert victim.running and cluster.routed_peers(seen.victim) == names - {victim.name}
    assert seen.solo_reply == b"echo:solo"
    assert seen.last == b"5"
    assert seen.healed == names


async def all_replicas_current(js: JetStreamContext) -> set[str]:
    """Names of the leader and its replicas once every replica is current, else raise."""
    cluster = (await js.stream_info("UNITS")).cluster
    assert cluster is not None and cluster.leader is not None
    replicas = cluster.replicas or []
    if len(replicas) != 2 or not all(peer.current and not peer.offline for peer in replicas):
        raise nats.errors.Error(f"replicas not yet current: {replicas}")
    return {cluster.leader, *(peer.name for peer in replicas if peer.name)}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_port_taken_between_pick_and_bind_is_retried_on_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "nats"
    earlier = data_dir / "node-1" / "jetstream" / "earlier-run.txt"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("kept")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    picks: list[list[int]] = []
    removed: list[Path] = []
    free_ports, rmtree = nats_cluster._free_ports, shutil.rmtree

    def first_pick_collides(host: str, count: int) -> list[int]:
        ports = free_ports(host, count)
        if not picks:
            ports[3] = port  # node-1's client port
        picks.append(ports)
        return ports

    def recorded_rmtree(path: Path, ignore_errors: bool = False) -> None:
        removed.append(path)
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(nats_cluster, "_free_ports", first_pick_collides)
    monkeypatch.setattr(nats_cluster.shutil, "rmtree", recorded_rmtree)
    try:
        with start_nats_cluster(data_dir, nodes=2) as cluster:
            ports = [node.client_port for node in cluster.nodes]
            log = cluster.nodes[1].log_path.read_text()
    finally:
        taken.close()

    assert len(picks) == 2
    assert port not in ports and ports == picks[1][0::3]
    assert "address already in use" in log
    # Only the store the failed attempt began is emptied; one from an earlier run is kept.
    assert removed == [data_dir / "node-0" / "jetstream"]
    assert earlier.read_text() == "kept"


def test_one_node_is_not_a_cluster(tmp_path: Path) -> None:
    # A lone node with a cluster block waits for routes forever and JetStream never starts.
    with pytest.raises(ValueError) as caught:
        start_nats_cluster(tmp_path / "nats", nodes=1)

    assert "at least 2 nodes (use start_nats_server), got 1" in str(caught.value)
    assert not (tmp_path / "nats").exists()
