"""The NATS seed list: where a car or a coordinator finds the cloud's NATS servers.

Every process that connects (agents, coordinator replicas) takes the servers as one
comma-separated flag, ``--nats-url nats://a:4222,nats://b:4222,nats://c:4222``, and gives the
client every seed, so it can connect to any node of a cluster and fail over to another when the
one it uses dies.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["NATS_URL_SCHEMES", "nats_servers"]

NATS_URL_SCHEMES = ("nats", "tls", "ws", "wss")


def nats_servers(url: str) -> list[str]:
    """Split a seed list ``"nats://a:4222, nats://b:4222"`` into its URLs, each checked.

    Every entry needs a scheme of nats, tls, ws or wss, a host and a port; whitespace around
    entries is dropped. Raises `ValueError` naming the first bad entry.
    """
    if not url.strip():
        raise ValueError("NATS URL list is empty: give nats://host:port[,nats://host:port...]")
    servers = []
    for position, raw in enumerate(url.split(","), start=1):
        entry = raw.strip()
        where = f"NATS URL {position} of {url!r}"
        if not entry:
            raise ValueError(f"{where} is empty (a stray comma?)")
        parts = urlsplit(entry)
        if parts.scheme not in NATS_URL_SCHEMES:
            schemes = ", ".join(f"{scheme}://" for scheme in NATS_URL_SCHEMES)
            raise ValueError(f"{where}, {entry!r}, must start with one of {schemes}")
        try:
            port = parts.port
        except ValueError:  # not a number, or out of range
            port = None
        if not parts.hostname or port is None:
            raise ValueError(f"{where}, {entry!r}, needs a host and a port (nats://host:4222)")
        if parts.query or parts.fragment or (parts.scheme in ("nats", "tls") and parts.path):
            raise ValueError(f"{where}, {entry!r}, has a path or query a NATS URL cannot carry")
        servers.append(entry)
    return servers
