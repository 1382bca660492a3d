"""Free TCP ports for the servers the embedded fleet starts (nats-server, PostgreSQL, HTTP).

A port found free here is released before the server binds it, so another process may take it
in between; callers that care (a cluster's fixed route ports) retry on "address in use".
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["free_port", "free_ports"]


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` now (all held open together while picked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        probes = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            probe.bind((host, 0))
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)[0]
