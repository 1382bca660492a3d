"""The private PostgreSQL server and the database helpers, against real servers."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import psycopg
import pytest

from idlefleet.embedded.ports import free_port
from idlefleet.embedded.postgres import (
    PrivatePostgres,
    _ServerUser,
    create_database,
    drop_database,
    postgres_bin_dir,
    reachable,
)


@pytest.fixture(scope="module")
def shared_private(
    private_postgres_factory: Callable[[Path], AbstractContextManager[PrivatePostgres]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrivatePostgres]:
    with private_postgres_factory(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def running_private(shared_private: PrivatePostgres) -> PrivatePostgres:
    """The module's private server, started again if an earlier test left it down."""
    if shared_private.pid is None:
        shared_private.start()
    return shared_private


def write_rows(dsn: str, table: str, values: list[int]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (x integer)")
        for value in values:
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


def read_rows(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute(f"SELECT x FROM {table} ORDER BY x")]


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def still_running(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Those of ``pids`` still running (not gone, not zombies) after up to ``timeout`` s."""

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def postmaster_started_at(dsn: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    return row[0]


def test_bin_dir_holds_the_server_programs() -> None:
    bin_dir = postgres_bin_dir()

    version = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    )

    assert os.access(bin_dir / "initdb", os.X_OK)
    assert version.stdout.startswith("postgres (PostgreSQL) ")


def test_private_server_accepts_connections_as_an_unprivileged_user(
    running_private: PrivatePostgres,
) -> None:
    expected_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert running_private.pid is not None

    with psycopg.connect(running_private.dsn()) as conn:
        row = conn.execute(
            "SELECT current_user, current_setting('data_directory'),"
            " current_setting('fsync'), current_setting('synchronous_commit'),"
            " current_setting('max_connections'), current_setting('server_encoding')"
        ).fetchone()

    assert row == ("postgres", str(running_private.cluster_dir), "on", "on", "200", "UTF8")
    assert os.stat(f"/proc/{running_private.pid}").st_uid == expected_uid
    assert running_private.cluster_dir.stat().st_uid == expected_uid
    assert running_private.dsn("other") == (
        f"postgresql://postgres@127.0.0.1:{running_private.port}/other"
    )


def test_stop_then_start_keeps_committed_rows_on_the_same_port(
    running_private: PrivatePostgres,
) -> None:
    write_rows(running_private.dsn(), "stop_start", [1, 2])
    port, old_pid = running_private.port, running_private.pid

    running_private.stop()
    stopped = reachable(running_private.dsn())
    running_private.start()

    assert not stopped
    assert running_private.port == port
    assert running_private.pid not in (None, old_pid)
    assert read_rows(running_private.dsn(), "stop_start") == [1, 2]


def test_restart_keeps_committed_rows(running_private: PrivatePostgres) -> None:
    write_rows(running_private.dsn(), "restarted", [7])
    started_before = postmaster_started_at(running_private.dsn())

    running_private.restart()

    assert postmaster_started_at(running_private.dsn()) != started_before
    assert read_rows(running_private.dsn(), "restarted") == [7]


def test_kill_refuses_a_postmaster_pid_that_is_not_ours(running_private: PrivatePostgres) -> None:
    lock_file = running_private.cluster_dir / "postmaster.pid"
    original = lock_file.read_text()
    lines = original.splitlines(keepends=True)
    pid = running_private.pid

    # The server re-reads this file once a minute; the forgery lasts milliseconds.
    lock_file.write_text("".join([f"{os.getpid()}\n", *lines[1:]]))
    try:
        with pytest.raises(RuntimeError, match="refusing to signal"):
            running_private.kill()
    finally:
        lock_file.write_text(original)

    assert running_private.pid == pid
    assert reachable(running_private.dsn())


def test_kill_then_start_recovers_committed_rows_and_signals_only_our_server(
    private_postgres: PrivatePostgres, postgres_admin_dsn: str
) -> None:
    shared_started = postmaster_started_at(postgres_admin_dsn)
    write_rows(private_postgres.dsn(), "crashed", [1, 2, 3])
    postmaster = private_postgres.pid
    assert postmaster is not None
    with psycopg.connect(private_postgres.dsn(), autocommit=True) as open_session:
        open_session.execute("INSERT INTO crashed VALUES (4)")
        children = child_pids(postmaster)  # checkpointer, walwriter, ..., this session's backend

        private_postgres.kill()

        down = not reachable(private_postgres.dsn())
    survivors = still_running([postmaster, *children])
    private_postgres.start()

    assert down
    assert len(children) >= 4
    assert survivors == []
    assert read_rows(private_postgres.dsn(), "crashed") == [1, 2, 3, 4]
    assert "automatic recovery in progress" in private_postgres.log_path.read_text()
    assert postmaster_started_at(postgres_admin_dsn) == shared_started


def test_create_and_drop_database_round_trip(postgres_admin_dsn: str) -> None:
    name = f"idlefleet_test_{uuid.uuid4().hex[:16]}"

    dsn = create_database(postgres_admin_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as session:
        current = session.execute("SELECT current_database()").fetchone()
        drop_database(postgres_admin_dsn, name)  # FORCE: our open session does not stop it
    drop_database(postgres_admin_dsn, name)  # already gone: no error

    with psycopg.connect(postgres_admin_dsn) as admin:
        left = admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        remaining = left.fetchone()
    assert current == (name,)
    assert remaining == (0,)


def test_database_fixture_gives_an_empty_database(postgres_database: str) -> None:
    write_rows(postgres_database, "scratch", [5])

    with psycopg.connect(postgres_database) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        count = tables.fetchone()

    assert name is not None and name[0].startswith("idlefleet_test_")
    assert count == (1,)


@pytest.mark.parametrize("name", ["", "Upper", "1st", "has-dash", 'x"; DROP', "a" * 64])
def test_database_names_outside_the_safe_set_are_refused(name: str) -> None:
    # The admin DSN points nowhere: validation must come before any connection.
    with pytest.raises(ValueError, match="database name"):
        create_database("postgresql://postgres@127.0.0.1:1/postgres", name)
    with pytest.raises(ValueError, match="database name"):
        drop_database("postgresql://postgres@127.0.0.1:1/postgres", name)


def test_reachable_tells_a_listening_server_from_a_closed_port(postgres_admin_dsn: str) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port('127.0.0.1')}/postgres"

    assert reachable(postgres_admin_dsn)
    assert not reachable(closed)


def test_unprivileged_user_needs_every_parent_searchable() -> None:
    root = Path(tempfile.mkdtemp(prefix="idlefleet-pg-test-"))  # mode 0700, ours
    (root / "data").mkdir(mode=0o755)
    someone_else = _ServerUser("someone", uid=os.geteuid() + 4242, gid=os.getegid() + 4242)
    owner = _ServerUser("owner", uid=root.stat().st_uid, gid=root.stat().st_gid)
    try:
        blocked = someone_else.blocking_ancestor(root / "data" / "pgdata")
        owner_blocked = owner.blocking_ancestor(root / "data" / "pgdata")
        root.chmod(0o711)
        unblocked = someone_else.blocking_ancestor(root / "data" / "pgdata")
    finally:
        shutil.rmtree(root)

    assert blocked == root
    assert owner_blocked is None
    assert unblocked is None
