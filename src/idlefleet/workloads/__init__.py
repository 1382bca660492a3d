"""The workloads the fleet runs, by kind: the one place a workload is registered.

Everything else (wire, store, dispatch, agent loop) is workload-neutral and finds a workload
here, by its ``kind`` (on the wire), its OpenAI ``endpoint`` (a batch's) or one of its models.
"""

from __future__ import annotations

from idlefleet.workloads.base import Workload
from idlefleet.workloads.chat import CHAT
from idlefleet.workloads.embeddings import EMBEDDINGS

__all__ = ["WORKLOADS", "Workload", "by_endpoint", "for_model"]

_REGISTERED: list[Workload] = [
    EMBEDDINGS,
    CHAT,
]
WORKLOADS: dict[str, Workload] = {w.kind: w for w in _REGISTERED}
"""Every workload, by kind. Adding one is its module plus one line here."""

_BY_ENDPOINT = {w.endpoint: w for w in WORKLOADS.values()}
_BY_MODEL = {model: w for w in WORKLOADS.values() for model in w.models()}


def by_endpoint(endpoint: str) -> Workload | None:
    """The workload serving an OpenAI endpoint (e.g. ``/v1/embeddings``), or None."""
    return _BY_ENDPOINT.get(endpoint)


def for_model(model: str) -> Workload | None:
    """The workload of a canonical model id, or None."""
    return _BY_MODEL.get(model)
