"""Persistent state of the coordinator behind one interface (:class:`Store`).

``open_store(url)`` picks the backend: ``sqlite:///path/to/file.db`` (the default, one file
in the data directory; ``factory.py`` lists the URL forms). A PostgreSQL backend will sit
behind the same interface and pass the same contract tests
(``tests/coordinator/store/test_store_contract.py``).
"""

from idlefleet.coordinator.store.base import (
    BatchRecord,
    CommitOutcome,
    FileRecord,
    Lease,
    LeasedItem,
    NewRequest,
    PolicyRecord,
    RequestCounts,
    RequestResult,
    Store,
    StoredRequest,
    VehicleRecord,
)
from idlefleet.coordinator.store.factory import open_store, sqlite_url

__all__ = [
    "BatchRecord",
    "CommitOutcome",
    "FileRecord",
    "Lease",
    "LeasedItem",
    "NewRequest",
    "PolicyRecord",
    "RequestCounts",
    "RequestResult",
    "Store",
    "StoredRequest",
    "VehicleRecord",
    "open_store",
    "sqlite_url",
]
