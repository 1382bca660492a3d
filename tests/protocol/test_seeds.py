"""The NATS seed list flag: split, checked, and every bad entry named."""

from __future__ import annotations

import pytest

from idlefleet.protocol.seeds import nats_servers


@pytest.mark.parametrize(
    ("text", "servers"),
    [
        ("nats://127.0.0.1:4222", ["nats://127.0.0.1:4222"]),
        ("nats://a:1,nats://b:2", ["nats://a:1", "nats://b:2"]),
        (" nats://a:1 ,\ttls://b:2 \n", ["nats://a:1", "tls://b:2"]),
        ("ws://a:80,wss://b:443/nats", ["ws://a:80", "wss://b:443/nats"]),
        (
            "nats://user:secret@a:1,nats://[::1]:4222",
            ["nats://user:secret@a:1", "nats://[::1]:4222"],
        ),
    ],
)
def test_nats_servers_splits_a_seed_list(text: str, servers: list[str]) -> None:
    assert nats_servers(text) == servers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "NATS URL list is empty"),
        ("  ", "NATS URL list is empty"),
        ("nats://a:1,,nats://b:2", "NATS URL 2 of 'nats://a:1,,nats://b:2' is empty"),
        ("nats://a:1,", "NATS URL 2 of 'nats://a:1,' is empty"),
        ("nats://a:1,http://b:2", "'http://b:2', must start with one of nats://, tls://"),
        ("a:4222", "'a:4222', must start with one of"),
        ("nats://a", "'nats://a', needs a host and a port"),
        ("nats://a:1,nats://:2", "'nats://:2', needs a host and a port"),
        ("nats://a:x", "'nats://a:x', needs a host and a port"),
        ("nats://a:99999", "'nats://a:99999', needs a host and a port"),
        ("nats://a:1/jobs", "'nats://a:1/jobs', has a path or query"),
    ],
)
def test_nats_servers_names_the_bad_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        nats_servers(text)
    assert message in str(caught.value)
