"""The ledger's edge: it posts what the coordinator's services report as done.

* A batch finalised: one charge per car (and model) that made its results, for the requests
  in its output file (``BatchService`` tallies them as it writes the file) and the energy the
  car reported for its leases of the batch. Posted before the batch is marked finished, with
  ids derived from the batch and the car, so a retried or taken-over finalisation posts
  nothing twice.
* An online request answered: one charge, queued and posted with the others every second
  (``flush``); a coordinator killed in that second loses those charges (the customer is not
  charged, the owner not paid), never doubles them.
* Verification's hooks: ``verified(car, through)`` releases the car's charges whose work
  ended by then from escrow; ``quarantined(car, ...)`` reverses those still in escrow. The
  hooks only note it (they run on the verifier's path); ``flush`` posts it.
  Without a verifier (``verified_through`` None) a charge is released as it is posted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from idlefleet.coordinator.ledger import (
    Entry,
    Prices,
    Work,
    charge_entry,
    release_entry,
    reversal_entry,
)
from idlefleet.coordinator.store import BatchRecord, Store
from idlefleet.protocol.policy import OwnerPolicy

log = logging.getLogger(__name__)

ONLINE_QUEUE = 100_000
"""Online charges waiting for a flush, at most (beyond: posted at once, one transaction)."""


@dataclass(frozen=True)
class Customer:
    """Whom an online request is charged to: the key's principal, and the key."""

    principal: str
    api_key_id: str | None = None


@dataclass
class Tally:
    """What one car did for one batch, counted as the output file is written."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class Accounts:
    def __init__(
        self,
        store: Store,
        prices: Prices | None = None,
        clock: Callable[[], float] = time.time,
        verified_through: Callable[[str], float] | None = None,
    ) -> None:
        self.store = store
        self.prices = prices or Prices()
        self.clock = clock
        self.verified_through = verified_through
        """The verifier's: a car's results are vouched for up to this time (None: no
        verification, nothing waits in escrow)."""
        self._lock = threading.Lock()
        self._online: list[Entry] = []
        self._owners: dict[str, str] = {}
        self._verified: dict[str, float] = {}
        self._quarantined: set[str] = set()

    # -- who -----------------------------------------------------------------------------------
    def owner_of(self, vehicle_id: str) -> str:
        with self._lock:
            known = self._owners.get(vehicle_id)
        if known is not None:
            return known
        enrolment = self.store.get_enrolment(vehicle_id)
        owner = enrolment.owner if enrolment is not None else f"car:{vehicle_id}"
        with self._lock:
            self._owners[vehicle_id] = owner
        return owner

    def region_of(self, vehicle_id: str) -> str | None:
        """The car's home region for its electricity tariff: its owner's first data region
        other than ``global`` (None: the default tariff)."""
        record = self.store.current_policy(vehicle_id)
        if record is None:
            return None
        try:
            regions = OwnerPolicy.model_validate_json(record.policy_json).data_regions
        except ValueError:
            return None
        return next((r for r in regions if r != "global"), None)

    # -- posting -------------------------------------------------------------------------------
    def batch_finished(
        self, batch: BatchRecord, tallies: dict[tuple[str, str], Tally]
    ) -> list[Entry]:
        """Post a batch's charges (one per car and model); returns them (posted or, on a
        retry, already there)."""
        principal = batch.principal or "anonymous"
        now = self.clock()
        energy = self.store.lease_energy(batch.id) if tallies else {}
        entries = []
        for (vehicle_id, model), tally in sorted(tallies.items()):
            if tally.requests == 0:
                continue
            # Lines of one batch may name different models: a car's energy for the batch is
            # split evenly over the models it ran (usually one).
            models = sum(1 for v, _ in tallies if v == vehicle_id)
            work = Work(
                key=f"batch:{batch.id}:{vehicle_id}" + (f":{model}" if models > 1 else ""),
                principal=principal,
                vehicle_id=vehicle_id,
                owner=self.owner_of(vehicle_id),
                model=model,
                requests=tally.requests,
                input_tokens=tally.input_tokens,
                output_tokens=tally.output_tokens,
                energy_j=energy.get(vehicle_id, 0.0) / models,
                work_at=now,
                batch_id=batch.id,
                region=self.region_of(vehicle_id),
                api_key_id=batch.api_key_id,
            )
            entries.append(charge_entry(work, self.prices, now))
        self._post(entries)
        return entries

    def online_answered(
        self,
        request_id: str,
        principal: str,
        vehicle_id: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        energy_j: float,
        api_key_id: str | None = None,
    ) -> None:
        """An online request was answered by ``vehicle_id`` for ``principal`` (asked with
        ``api_key_id``): its charge is queued (blocking: the car's owner and region may be
        read from the store)."""
        now = self.clock()
        self.online_finished(
            Work(
                key=f"online:{request_id}",
                principal=principal,
                vehicle_id=vehicle_id,
                owner=self.owner_of(vehicle_id),
                model=model,
                requests=1,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                energy_j=energy_j,
                work_at=now,
                region=self.region_of(vehicle_id),
                api_key_id=api_key_id,
            )
        )

    def online_finished(self, work: Work) -> None:
        """An online request was answered: its charge is posted with the next flush."""
        entry = charge_entry(work, self.prices, self.clock())
        with self._lock:
            self._online.append(entry)
            full = len(self._online) >= ONLINE_QUEUE
        if full:
            self.flush()

    def flush(self) -> int:
        """Post the online charges queued since the last flush, then the releases and
        reversals verification asked for (every second, off the hot path). Returns how many
        entries were posted."""
        with self._lock:
            entries, self._online = self._online, []
        posted = 0
        if entries:
            try:
                posted = self._post(entries)
            except Exception:
                with self._lock:  # the store is down: keep them for the next flush
                    self._online[:0] = entries[: ONLINE_QUEUE - len(self._online)]
                raise
        released, reversed_ = self.settle()
        return posted + released + reversed_

    def _post(self, charges: list[Entry]) -> int:
        """Post charges, then release from escrow what of their cars is verified (as
        stored: a charge posted before, under the same id, is the one released)."""
        posted = self.store.post_entries(charges)
        for vehicle_id in sorted({c.vehicle_id for c in charges}):
            if self.verified_through is None:
                self._settle(vehicle_id, None, release_entry)
            else:
                self._settle(vehicle_id, self.verified_through(vehicle_id), release_entry)
        return posted

    def _settle(
        self, vehicle_id: str, through: float | None, how: Callable[[Entry, float], Entry]
    ) -> int:
        """Release (or reverse) the car's unsettled charges for work up to ``through``."""
        now = self.clock()
        done = 0
        while charges := self.store.unsettled_charges(vehicle_id, through, limit=1000):
            done += self.store.post_entries([how(c, now) for c in charges])
            if len(charges) < 1000:
                break
        return done

    # -- verification's hooks ------------------------------------------------------------------
    def verified(self, vehicle_id: str, through: float) -> None:
        """The verifier's hook (on its hot path): the car's results are verified up to
        ``through``; its charges for work done by then leave escrow at the next flush."""
        with self._lock:
            if through > self._verified.get(vehicle_id, float("-inf")):
                self._verified[vehicle_id] = through

    def quarantined(self, vehicle_id: str, at: float, redone: int = 0) -> None:
        """The verifier's hook: the car was caught; its charges still in escrow are reversed
        at the next flush (the customer refunded, the owner not paid)."""
        with self._lock:
            self._quarantined.add(vehicle_id)

    def settle(self) -> tuple[int, int]:
        """Post the releases and reversals the hooks asked for: (released, reversed)."""
        with self._lock:
            verified, self._verified = self._verified, {}
            caught, self._quarantined = self._quarantined, set()
        released = reversed_ = 0
        # Releases first: what was verified before the car was caught stays earned.
        for vehicle_id, through in verified.items():
            released += self._settle(vehicle_id, through, release_entry)
        for vehicle_id in caught:
            undone = self._settle(vehicle_id, None, reversal_entry)
            if undone:
                log.warning("reversed %d charges of quarantined car %s", undone, vehicle_id)
            reversed_ += undone
        return released, reversed_
