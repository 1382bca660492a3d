"""Choose a store backend from a URL.

SQLite URLs follow SQLAlchemy's convention, which operators already know: ``sqlite:///rel.db``
(three slashes) is relative to the working directory, ``sqlite:////var/lib/x.db`` (four) is
absolute, and ``sqlite://`` or ``sqlite:///:memory:`` is an in-memory database.

PostgreSQL URLs are libpq's own (``postgresql://user@host:5432/db`` or ``postgres://…``) and
go to psycopg as they are, query parameters included: ``?options=-csearch_path%3Dmyschema``
puts the store's tables in schema ``myschema``. That backend needs the ``postgresql`` extra
(``pip install 'idlefleet[postgresql]'``).
"""

from __future__ import annotations

from pathlib import Path

from idlefleet.coordinator.store.base import Store


def sqlite_url(path: Path) -> str:
    """The store URL of the SQLite database file at ``path``."""
    return f"sqlite:///{path}"


def open_store(url: str) -> Store:
    """Open the store named by ``url``; ``ValueError`` if no backend serves it."""
    if url == "sqlite://" or url.startswith("sqlite:///"):
        from idlefleet.coordinator.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://").removeprefix("/") or ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from idlefleet.coordinator.store.postgres import PostgresStore
        except ModuleNotFoundError as exc:
            if exc.name not in ("psycopg", "psycopg_pool"):
                raise
            raise ValueError(
                f"store URL {url!r} needs the PostgreSQL driver ({exc.name} is not installed): "
                "pip install 'idlefleet[postgresql]'"
            ) from exc
        return PostgresStore(url)
    raise ValueError(
        f"unsupported store URL {url!r}: expected sqlite:///relative.db, sqlite:////abs.db "
        "or postgresql://user@host/db"
    )
