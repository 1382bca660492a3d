"""Run a private PostgreSQL server, and create and drop databases on any server.

A private server is a cluster of our own (``initdb``) under ``data_dir/pgdata`` and a
``postgres`` process that is our child, so every signal goes through our own process handle and
no other server on the machine is ever touched. It exists for tests that must restart or crash
the database under a running coordinator, and for machines with no server at all. PostgreSQL
refuses to run as root, so under root the cluster and the server run as an unprivileged user
(``nobody`` by default), set by ``subprocess`` itself (``user=``, ``group=``,
``extra_groups=[]``) rather than by a ``preexec_fn``, which is unsafe in a threaded process.
That user must be able to reach ``data_dir``: every directory above it must be searchable by
others, which pytest's own temp root (mode 0700) is not. Readiness is a successful connection,
never a sleep.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from idlefleet.embedded.ports import free_port

_BINARIES = ("initdb", "postgres")
_SERVER_SETTINGS = {
    # Durable on purpose: the tests that crash the server check that committed data survives.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
}
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_POLL_SECONDS = 0.05


def postgres_bin_dir() -> Path:
    """Directory holding ``initdb`` and ``postgres``: PATH first, then the newest Debian install.

    A PATH entry is resolved through symlinks, so both programs come from one installation.
    """
    found = shutil.which("initdb")
    if found:
        candidate = Path(found).resolve().parent
        if all((candidate / name).is_file() for name in _BINARIES):
            return candidate
    installs = Path("/usr/lib/postgresql")
    versions = sorted(
        (int(entry.name), entry / "bin")
        for entry in (installs.iterdir() if installs.is_dir() else [])
        if entry.name.isdigit()
    )
    for _, candidate in reversed(versions):
        if all((candidate / name).is_file() for name in _BINARIES):
            return candidate
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        "/usr/lib/postgresql/<version>/bin: install the server (apt-get install postgresql)"
    )


def reachable(dsn: str, timeout: float = 2.0) -> bool:
    """Whether a server accepts a connection at ``dsn`` (libpq waits at least 2 s)."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(2, math.ceil(timeout))):
            return True
    except psycopg.OperationalError:
        return False


def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` through ``admin_dsn``; return the DSN of the new database."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(_checked_name(name)))
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(statement)
    return make_conninfo(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its sessions (``WITH (FORCE)``)."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(_checked_name(name))
    )
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(statement)


def _checked_name(name: str) -> str:
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(
            f"database name {name!r} must be 1-63 characters of a-z, 0-9 and _, "
            "not starting with a digit"
        )
    return name


@dataclass(frozen=True)
class _ServerUser:
    """Who initdb and postgres run as: ``uid`` None means as we are, no change."""

    name: str
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_current_process(cls, run_as: str) -> _ServerUser:
        if os.geteuid() != 0:
            return cls(f"uid {os.geteuid()}")
        entry = pwd.getpwnam(run_as)
        if entry.pw_uid == 0:
            raise ValueError(f"run_as user {run_as!r} is root; PostgreSQL refuses to run as root")
        return cls(run_as, entry.pw_uid, entry.pw_gid)

    @property
    def extra_groups(self) -> list[int] | None:
        # Dropping to a user must drop root's supplementary groups too.
        return None if self.uid is None else []

    def give(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def blocking_ancestor(self, path: Path) -> Path | None:
        """First directory above ``path`` this user cannot search (by mode bits; ACLs ignored)."""
        if self.uid is None:
            return None
        for parent in reversed(path.parents):
            info = parent.stat()
            if info.st_uid == self.uid:
                allowed = info.st_mode & 0o100
            elif info.st_gid == self.gid:
                allowed = info.st_mode & 0o010
            else:
                allowed = info.st_mode & 0o001
            if not allowed:
                return parent
        return None


class PrivatePostgres:
    """A PostgreSQL cluster of our own and, while running, its server process (our child).

    Made by `start_private_postgres`, which runs initdb and the first ``start``.
    ``stop`` then ``start`` is a clean restart on the same port and data; ``kill`` is a crash
    (SIGKILL to the postmaster) after which ``start`` runs crash recovery.
    """

    def __init__(self, data_dir: Path, host: str, port: int, user: _ServerUser) -> None:
        self.data_dir = data_dir
        self.cluster_dir = data_dir / "pgdata"
        self.log_path = data_dir / "postgres.log"
        self.host = host
        self.port = port
        self._user = user
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def dsn(self, dbname: str = "postgres") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://postgres@{host}:{self.port}/{dbname}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it accepts connections."""
        if self.pid is not None:
            raise RuntimeError(f"PostgreSQL in {self.cluster_dir} is already running")
        self._wait_for_old_processes(timeout)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="idlefleet-pgsock-"))
        self._user.give(self._socket_dir)
        command = [
            str(postgres_bin_dir() / "postgres"),
            "-D", str(self.cluster_dir),
            "-c", f"listen_addresses={self.host}",
            "-p", str(self.port),
            "-k", str(self._socket_dir),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_server_environment(),
                process_group=0,  # a Ctrl-C at the terminal is for us; we stop the server
                user=self._user.uid,
                group=self._user.gid,
                extra_groups=self._user.extra_groups,
            )
        deadline = time.monotonic() + timeout
        while not reachable(self.dsn(), timeout=2):
            if self._process.poll() is not None:
                self._forget_process()
                raise RuntimeError(f"PostgreSQL exited while starting:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self._kill_child(timeout)
                raise TimeoutError(
                    f"PostgreSQL not accepting connections after {timeout} s:\n{self._log_tail()}"
                )
            time.sleep(_POLL_SECONDS)

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut the server down (``smart``, ``fast`` or ``immediate``); no-op when stopped.

        If it has not exited after ``timeout`` it is killed and TimeoutError is raised.
        """
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(_STOP_SIGNALS[mode])
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_child(timeout)
                raise TimeoutError(
                    f"PostgreSQL did not stop ({mode}) in {timeout} s; killed it"
                ) from None
        self._forget_process()

    def restart(self, timeout: float = 60.0) -> None:
        self.stop("fast", timeout)
        self.start(timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """Crash the server: SIGKILL to the postmaster, then wait for its children to go.

        The PID is taken from ``postmaster.pid`` and must be our own child's, so nothing else is
        ever signalled. The children, left without a postmaster, exit by themselves; this returns
        once none of them still holds the cluster's shared memory, so ``start`` can follow.
        """
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"PostgreSQL in {self.cluster_dir} is not running")
        recorded = self._recorded_postmaster()
        if recorded is None or recorded[0] != self._process.pid:
            raise RuntimeError(
                f"{self.cluster_dir / 'postmaster.pid'} names PID "
                f"{recorded[0] if recorded else None}, not our postmaster {self._process.pid}; "
                "refusing to signal it"
            )
        self._kill_child(timeout)

    def _kill_child(self, timeout: float) -> None:
        # Our own child by construction: Popen signals only a process it has not yet reaped.
        assert self._process is not None
        self._process.kill()
        self._process.wait()
        self._wait_for_old_processes(timeout)
        self._forget_process()

    def _recorded_postmaster(self) -> tuple[int, int] | None:
        """(PID, shared memory id) from ``postmaster.pid``, if it is there and complete."""
        try:
            lines = (self.cluster_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 7 or len(lines[6].split()) != 2:
            return None
        return int(lines[0]), int(lines[6].split()[1])

    def _wait_for_old_processes(self, timeout: float) -> None:
        """Wait until no process of a crashed server still holds its shared memory.

        A new postmaster refuses to start while one does ("pre-existing shared memory block is
        still in use"); the count is the kernel's own, so this signals and guesses nothing.
        """
        recorded = self._recorded_postmaster()
        if recorded is None:
            return
        deadline = time.monotonic() + timeout
        while _shared_memory_attachments(recorded[1]) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"processes of the old server of {self.cluster_dir} still hold its shared "
                    f"memory (id {recorded[1]}) after {timeout} s"
                )
            time.sleep(_POLL_SECONDS)

    def _forget_process(self) -> None:
        self._process = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def start_private_postgres(
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 60.0,
    run_as: str = "nobody",
) -> PrivatePostgres:
    """Create a cluster in ``data_dir/pgdata`` and start its server on ``host:port``.

    Superuser ``postgres``, UTF8, locale C, trust authentication for local sockets and
    loopback TCP. ``port`` 0 picks a free port. Under root, initdb and the server run as
    ``run_as``, which then owns the cluster and the socket directory.
    """
    data_dir = data_dir.absolute()
    user = _ServerUser.for_current_process(run_as)
    data_dir.mkdir(parents=True, exist_ok=True)
    blocked = user.blocking_ancestor(data_dir / "pgdata")
    if blocked is not None:
        raise PermissionError(
            f"PostgreSQL runs as {user.name!r} (uid {user.uid}) because we are root, and that "
            f"user cannot enter {blocked} (mode {blocked.stat().st_mode & 0o777:04o}); put the "
            "data directory where every parent is searchable by others, e.g. under /tmp"
        )
    cluster_dir = data_dir / "pgdata"
    cluster_dir.mkdir(mode=0o700)
    user.give(cluster_dir)
    initdb = subprocess.run(
        [
            str(postgres_bin_dir() / "initdb"),
            "-D", str(cluster_dir),
            "-U", "postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--auth=trust",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_server_environment(),
        timeout=timeout,
        check=False,
        user=user.uid,
        group=user.gid,
        extra_groups=user.extra_groups,
    )  # fmt: skip
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")
    settings = "".join(f"{name} = {value}\n" for name, value in _SERVER_SETTINGS.items())
    with open(cluster_dir / "postgresql.conf", "a") as conf:
        conf.write(f"\n# idlefleet private server\n{settings}")
    server = PrivatePostgres(data_dir, host, port or free_port(host), user)
    server.start(timeout)
    return server


def _server_environment() -> dict[str, str]:
    # PGPORT, PGDATA and friends in our environment must not redirect the server.
    return {name: value for name, value in os.environ.items() if not name.startswith("PG")}


def _shared_memory_attachments(shmid: int) -> int:
    """How many processes have System V segment ``shmid`` attached (0 if it is gone)."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return 0
    header = lines[0].split()
    id_column, count_column = header.index("shmid"), header.index("nattch")
    for line in lines[1:]:
        fields = line.split()
        if int(fields[id_column]) == shmid:
            return int(fields[count_column])
    return 0
