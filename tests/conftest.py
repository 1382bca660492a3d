"""Fixtures for every test package: PostgreSQL servers and throwaway databases on them.

Tests never skip for want of PostgreSQL: they use the server at ``IDLEFLEET_TEST_PG_DSN``
(default: the machine's own, 127.0.0.1:5432) when it answers, else a private server they start,
and fail with the reason when neither works. Tests that stop, restart or crash a server get a
private one of their own; the shared server is never signalled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from idlefleet.embedded.postgres import (
    PrivatePostgres,
    create_database,
    drop_database,
    reachable,
    start_private_postgres,
)

DEFAULT_TEST_PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_DATABASE_PREFIX = "idlefleet_test_"

PrivatePostgresFactory = Callable[[Path], AbstractContextManager[PrivatePostgres]]


@contextmanager
def _running_private_postgres(keep_log_in: Path) -> Iterator[PrivatePostgres]:
    """A private server in a fresh directory under the system temp dir, removed afterwards.

    Not in pytest's ``tmp_path``: pytest keeps its temp root at mode 0700 (and resets it at every
    session start), and under root the server runs as an unprivileged user who could not enter
    it. The server log is copied to ``keep_log_in``, so it outlives the cluster for post-mortems.
    """
    root = Path(tempfile.mkdtemp(prefix="idlefleet-pg-"))
    root.chmod(0o711)  # the server's user may pass through, not list
    try:
        server = start_private_postgres(root / "data")
        try:
            yield server
        finally:
            server.stop()
    finally:
        log = root / "data" / "postgres.log"
        if log.exists():
            shutil.copyfile(log, keep_log_in / "postgres.log")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_postgres_factory() -> PrivatePostgresFactory:
    """``with factory(log_dir) as server:`` runs a private server for any fixture scope."""
    return _running_private_postgres


@pytest.fixture(scope="session")
def postgres_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Superuser DSN of a PostgreSQL server for creating test databases."""
    dsn = os.environ.get("IDLEFLEET_TEST_PG_DSN", DEFAULT_TEST_PG_DSN)
    if reachable(dsn):
        yield dsn
        return
    named = "IDLEFLEET_TEST_PG_DSN" if "IDLEFLEET_TEST_PG_DSN" in os.environ else dsn
    with ExitStack() as stack:
        try:
            server = stack.enter_context(
                _running_private_postgres(tmp_path_factory.mktemp("postgres"))
            )
        except Exception as error:  # any reason at all: report it rather than skip
            failure = f"{type(error).__name__}: {error}"
        else:
            failure = ""
        if failure:  # outside the except block, so the report is the reason alone
            pytest.fail(
                f"PostgreSQL needed: no server answers at {named}, and starting a private one "
                f"failed: {failure}",
                pytrace=False,
            )
        yield server.dsn()


@pytest.fixture
def postgres_database(postgres_admin_dsn: str) -> Iterator[str]:
    """DSN of a new, empty database, dropped after the test."""
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
    dsn = create_database(postgres_admin_dsn, name)
    yield dsn
    drop_database(postgres_admin_dsn, name)


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A private server of this test's own, which it may stop, restart or kill."""
    with _running_private_postgres(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's GGUF, opened (a ``GGUFModel``)."""
    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path

    return GGUFModel(smollm2_path())


@pytest.fixture(scope="session")
def llama_session(smollm2: Any) -> Any:
    """An ONNX Runtime session (1 thread) on SmolLM2's graph, built once for the whole run:
    ~10 s and ~650 MB of float32 weights, shared by the model and engine tests."""
    import onnxruntime as ort

    from idlefleet.models.llama_onnx import build_llama_model

    model = build_llama_model(smollm2.config, smollm2.weights())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
