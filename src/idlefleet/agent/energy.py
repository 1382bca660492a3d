"""Energy metering in the car: what compute cost, per unit of work and per local day.

Each model run is metered as power × time: the chip's reported power when the car reports it
(the VSS overlay's ``Health.Resources.Power``), otherwise the hardware's rated power at full
load, which over-counts rather than under-counts. The per-day total is counted in the owner's
local day, because that is the day the owner's cap is written in, and is kept in a small file
so a restarted agent does not forget what it already used today: the file is rewritten (a new
file renamed over the old, so it is never half-written) after every run is metered, so even an
agent killed with SIGKILL keeps the day's energy up to its last finished run; it is flushed to
disk (fsync) at most once a second, so a power cut loses at most that second.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from datetime import date
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["JOULES_PER_KWH", "EnergyMeter"]

JOULES_PER_KWH = 3.6e6
SYNC_EVERY_S = 1.0
"""At most one fsync of the meter file this often (a rename without one survives a killed
process, not a power cut)."""


class EnergyMeter:
    """Joules used today (local day) and per lease; thread-safe."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._synced_at = -math.inf
        self._day: date | None = None
        self._today_j = 0.0
        self._by_lease: dict[str, float] = {}
        self._total_j = 0.0
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            self._day = date.fromisoformat(saved["day"])
            self._today_j = float(saved["today_j"])
            if not (math.isfinite(self._today_j) and self._today_j >= 0):
                raise ValueError(f"today_j must be a finite number >= 0, not {saved['today_j']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refusing to work for ever would be worse than a day's cap counted from zero, and
            # the state-of-charge floor still protects the battery; but say so.
            log.warning("energy meter file %s unreadable (%s); starting from 0", path, exc)
            self._day, self._today_j = None, 0.0

    def today_kwh(self, day: date) -> float:
        with self._lock:
            return (self._today_j if self._day == day else 0.0) / JOULES_PER_KWH

    def record(self, joules: float, day: date, lease_id: str | None = None) -> None:
        """Add ``joules`` spent on ``day`` (the owner's local date), for ``lease_id`` if any,
        and write the day's total to the file."""
        if not (math.isfinite(joules) and joules >= 0):
            raise ValueError(f"energy must be a finite number >= 0, not {joules}")
        with self._lock:
            if self._day != day:
                self._day, self._today_j = day, 0.0
            self._today_j += joules
            self._total_j += joules
            if lease_id is not None:
                self._by_lease[lease_id] = self._by_lease.get(lease_id, 0.0) + joules
        self.save()

    def take_lease(self, lease_id: str) -> float:
        """Joules recorded for ``lease_id`` since the last take (reported once, then reset)."""
        with self._lock:
            return self._by_lease.pop(lease_id, 0.0)

    @property
    def total_j(self) -> float:
        with self._lock:
            return self._total_j

    def save(self) -> None:
        """Write the day's total: to a new file, renamed over the old one (atomic)."""
        if self._path is None:
            return
        with self._save_lock:
            with self._lock:  # read under the save lock: the last writer writes the latest
                if self._day is None:
                    return
                payload = json.dumps({"day": self._day.isoformat(), "today_j": self._today_j})
            now = time.monotonic()
            sync = now - self._synced_at >= SYNC_EVERY_S
            tmp = self._path.with_suffix(".tmp")
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w") as f:
                    f.write(payload)
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, self._path)
            except OSError as exc:  # a full disk must not stop the car's compute
                log.warning("energy meter file %s not written: %s", self._path, exc)
                return
            if sync:
                self._synced_at = now
