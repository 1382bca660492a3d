"""Persistent state of the coordinator behind one interface (:class:`Store`).

``open_store(url)`` picks the backend: ``sqlite:///path/to/file.db`` (the default, one file
in the data directory) or ``postgresql://…`` (scale-out: coordinator replicas share it);
``factory.py`` lists the URL forms. Both pass the same contract suite
(``tests/coordinator/store/test_store_contract.py``).
"""

from idlefleet.coordinator.store.base import (
    ApiKeyRecord,
    BatchRecord,
    CommitOutcome,
    Enrolment,
    FileRecord,
    FleetCounts,
    Lease,
    LeaseAsk,
    LeasedItem,
    NewRequest,
    PolicyRecord,
    RequestCounts,
    RequestResult,
    ResultCommit,
    Store,
    StoredRequest,
    StoreUnavailable,
    VehicleLiveness,
    VehicleRecord,
    VehicleSeen,
)
from idlefleet.coordinator.store.factory import open_store, sqlite_url

__all__ = [
    "ApiKeyRecord",
    "BatchRecord",
    "CommitOutcome",
    "Enrolment",
    "FileRecord",
    "FleetCounts",
    "Lease",
    "LeaseAsk",
    "LeasedItem",
    "NewRequest",
    "PolicyRecord",
    "RequestCounts",
    "RequestResult",
    "ResultCommit",
    "Store",
    "StoreUnavailable",
    "StoredRequest",
    "VehicleLiveness",
    "VehicleRecord",
    "VehicleSeen",
    "open_store",
    "sqlite_url",
]
