"""Choose a store backend from a URL."""

from __future__ import annotations

from pathlib import Path

from idlefleet.coordinator.store.base import Store


def open_store(url: str) -> Store:
    """Open the store named by ``url`` (``sqlite:///abs/path.db`` or ``sqlite://:memory:``)."""
    if url.startswith("sqlite://"):
        from idlefleet.coordinator.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return SqliteStore(path)
    raise ValueError(f"unsupported store URL {url!r}: expected sqlite:///path/to/file.db")
